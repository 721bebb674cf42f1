"""The FLOPs of a training step, and each report window's achieved FLOP/s and MFU.

Model FLOPs, counted as the field counts them for MFU: matrix products only, 2 per multiply-add, from
the model's config (ftkit.models.flops) and each batch's real tokens; per token, with N the weights a
token passes through (the active experts only, in a mixture of experts):
- full: forward 2N, backward 4N (input and weight gradients): 6N;
- lora, dora, prompt, prefix: the frozen base has no weight gradients: forward 2N, and 2N of input
  gradients only where a gradient flows, i.e. after the first trained weight (blocks below the lowest
  adapted block run forward only; the lowest block's first projections need no input gradient when its
  input carries none; prompt tuning's virtual tokens carry one from the first block). Plus the adapter's
  own: forward x @ A @ B, the weight gradients of A and B, and the input gradients through them (about
  6 x its weights per token); DoRA also forms W + BA for its norm once per layer and micro-batch. LoRA on
  routed experts counts as LoRA on the active experts (PEFT instead merges BA into every expert's weight
  each forward and takes the merged weight's full gradient: work the method does not need);
- attention: per example, causal (query i attends to i keys, at most the sliding window, plus prefix
  tuning's virtual keys; PaLM's 12 L H Q T per token counts the whole T x T square), 2 x heads x head_dim
  multiply-adds per query-key pair forward, twice that backward where the gradient flows. Counted per packed example: padding, and the pairs across the
  examples of a packed row that a block-diagonal mask throws away, are not model FLOPs;
- the output head at the positions the loss reads: both backends run it only there (ftkit_torch.loss,
  the MLX backend's target-position head). Where one falls back to every position (torch's prompt and
  prefix tuning, logits post-processed by the model) the extra head work is not counted: the model does
  not need it.
Not counted: gradient checkpointing's recomputed forward (hardware FLOPs, not model FLOPs), elementwise
work, the optimizer, a preference objective's reference forward. Filler micro-batches (weight 0, keeping processes in step) are not counted either.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftkit.adapters import targets as adapter_targets
from ftkit.backend import peak as peaks
from ftkit.common.errors import FtkitError
from ftkit.data.batch import Batch
from ftkit.data.batching import Share
from ftkit.data.packing import segment_ids
from ftkit.models.flops import STAGES, Architecture, Linear
from ftkit.recipe.schema import MethodSection


@dataclass(frozen=True)
class Method:
    """What of the recipe's method the FLOPs depend on."""

    kind: str  # lora | dora | prompt | prefix | full
    rank: int = 8
    targets: tuple[str, ...] = (adapter_targets.ALL_LINEAR,)
    layers: int | None = None  # adapt the last N blocks
    virtual: int = 0  # prompt / prefix: virtual tokens per example

    @classmethod
    def of(cls, m: MethodSection) -> Method:
        names = (m.targets,) if isinstance(m.targets, str) else tuple(m.targets)
        return cls(m.kind, m.rank, names, m.layers, m.num_virtual_tokens if m.kind in ("prompt", "prefix") else 0)


def _adapted(path: str, block: int, n_blocks: int, method: Method) -> bool:
    """Whether the method puts an adapter on this linear layer (the rule of ftkit.adapters.targets.select)."""
    if method.kind not in ("lora", "dora") or (method.layers is not None and block < n_blocks - method.layers):
        return False
    if adapter_targets.is_router(path):
        return False
    if not adapter_targets.is_expert(path):
        return any(t == adapter_targets.ALL_LINEAR or path == t or path.endswith("." + t) for t in method.targets)
    # routed experts only when a target names them ("experts", "experts.down_proj"), never through "all-linear"
    return any("experts" in t.split(".") and any(p == t or p.endswith("." + t) for p in (path, path.rsplit(".", 1)[0]))
               for t in method.targets)


class FlopModel:
    """Multiply-adds per token, per target position, per query-key pair and per micro-batch, for one method."""

    def __init__(self, arch: Architecture, method: Method):
        self.arch, self.method = arch, method
        full = method.kind == "full"
        grad = method.kind in ("full", "prompt")  # the first block's input carries a gradient (trained embeddings, virtual tokens)
        self.token = 0.0  # forward, input gradients, weight gradients, adapters
        self.micro_batch = 0.0  # DoRA: W + BA per adapted layer
        half = arch.heads * arch.head_dim  # multiply-adds per query-key pair of one of q.k, p.v and their 4 gradients
        self.pair: dict[int | None, float] = {}  # per attention window: multiply-adds per pair over the blocks that have it
        for b, block in enumerate(arch.blocks):
            block_in, attn_branch = grad, False
            for stage in STAGES:
                if stage == "mlp_in" and arch.parallel:  # the MLP branch reads the block's input, not the attention's output
                    attn_branch, grad = grad, block_in
                linears = [lin for lin in block.linears if lin.stage == stage]
                adapted = [lin for lin in linears if _adapted(f"model.layers.{b}.{lin.name}", b, len(arch.blocks), method)]
                for lin in linears:
                    self.token += lin.macs * (1 + grad + full)  # forward, input gradient where one flows, weight gradient
                for lin in adapted:
                    self.token += self._adapter(lin, grad)
                    self.micro_batch += method.rank * lin.fan_in * lin.fan_out * lin.copies if method.kind == "dora" else 0
                if stage == "attn_in":  # which of q, k, v need a gradient: the attention backward computes only theirs
                    q, k, v = (grad or any(lin.name.endswith((p, "qkv_proj")) for lin in adapted) or (p != "q_proj" and method.kind == "prefix")
                               for p in ("q_proj", "k_proj", "v_proj"))
                    backward = (q or k) + v + q + k  # d(scores) from d(out), d(v), d(q), d(k)
                    self.pair[block.window] = self.pair.get(block.window, 0.0) + half * (2 + backward)
                grad = grad or bool(adapted) or (stage == "attn_in" and method.kind == "prefix")  # prefix: trained keys/values
            grad = grad or attn_branch
        self.target = arch.head_macs * (2 + full)  # forward, input gradient (something below is trained), full: weight gradient

    def _adapter(self, lin: Linear, grad_in: bool) -> float:
        """x @ A @ B forward; weight gradients of A and B; input gradients through B, and through A when its input needs one."""
        a, b = self.method.rank * lin.fan_in * lin.active, self.method.rank * lin.fan_out * lin.active
        return (a + b) + (a + b) + b + (a if grad_in else 0)

    def per_token(self) -> float:
        """FLOPs per token of the linear layers and adapters, forward and backward (no attention, no head)."""
        return 2 * self.token

    def examples(self, lengths: Sequence[int] | np.ndarray, targets: int, micro_batches: int = 0, causal: bool = True) -> float:
        """FLOPs (forward and backward) of examples of these lengths (input tokens each) with `targets` loss
        positions in all, run in `micro_batches` micro-batches. `causal=False` counts every query against every
        key, as a dense attention kernel computes it (what FlopCounterMode sees)."""
        n = np.asarray(lengths, dtype=np.int64)
        prompt = self.method.virtual if self.method.kind == "prompt" else 0
        prefix = self.method.virtual if self.method.kind == "prefix" else 0
        n = n + prompt
        macs = self.token * int(n.sum()) + self.target * targets + self.micro_batch * micro_batches
        for window, per_pair in self.pair.items():
            macs += per_pair * self.arch.attention_pairs(n, window, prefix, causal)
        return 2.0 * macs

    def batch(self, batch: Batch) -> float:
        lengths, targets = example_lengths(batch), int((batch.mask > 0).sum())
        return self.examples(lengths, targets, micro_batches=1)


def example_lengths(batch: Batch) -> np.ndarray:
    """The real (non-padding) tokens of each example of a batch: one per row, or each packed example of a row."""
    real = batch.attention_mask > 0
    if batch.positions is None:
        lengths = real.sum(axis=1)
    else:
        seg = segment_ids(batch.positions).astype(np.int64)
        key = np.arange(real.shape[0], dtype=np.int64)[:, None] * (real.shape[1] + 1) + seg
        lengths = np.bincount(key[real])
    return lengths[lengths > 0]


def _lengths(train: Any) -> list[int]:
    """Token counts of the training examples (a preference pair: its chosen sequence)."""
    if hasattr(train, "lengths"):
        return list(train.lengths())
    return [len(getattr(e, "chosen", e).ids) for e in train]


def probe_tokens(lengths: Sequence[int], batch_size: int) -> int:
    """About a micro-batch of tokens (the median example x batch size), rounded to a power of two in [128, 8192],
    so that runs of similar data share one cached probe."""
    typical = max(1, int(statistics.median(lengths)) if len(lengths) else 256) * max(1, batch_size)
    return int(min(8192, max(128, 2 ** round(np.log2(typical)))))


class Meter:
    """The FLOPs of the steps since the last report; `report` turns them into FLOP/s and MFU."""

    def __init__(self, model: FlopModel | None, peak: peaks.Peak | None = None, processes: int = 1, note: str | None = None):
        self.model, self.peak, self.processes, self.note = model, peak, processes, note
        self.flops, self.tokens = 0.0, 0

    @classmethod
    def for_run(cls, prep: Any, backend: Any, info: dict[str, Any], processes: int, hardware: dict[str, Any] | None) -> Meter:
        """The run's meter; the peak is found (measured, the first time on an unknown device) only where
        `hardware` is given: the process that writes the metrics."""
        try:
            config = json.loads((prep.model_path / "config.json").read_text(encoding="utf-8"))
            model = FlopModel(Architecture.from_config(config), Method.of(prep.recipe.method))
        except (OSError, ValueError, TypeError, FtkitError) as e:
            return cls(None, note=f"no FLOP accounting: {e}")
        peak, note = None, None
        if hardware is not None:
            shapes = model.arch.gemm_shapes(probe_tokens(_lengths(prep.splits.train), prep.recipe.train.batch_size))
            try:
                peak = peaks.for_run(backend, info, hardware.get("cpu"), shapes)
            except FtkitError:
                raise  # FTKIT_PEAK_FLOPS that is not a number
            except Exception as e:  # a probe that fails leaves MFU out; it does not stop the run
                note = f"no MFU: the GEMM probe failed ({type(e).__name__}: {e})"
        return cls(model, peak, processes, note)

    def add(self, share: Share) -> None:
        """A step: this process's micro-batches (not the fillers), and the step's tokens over all processes."""
        if self.model is not None:
            # A preference micro-batch holds its sequences in `.batch` (its reference model's forward is not counted).
            self.flops += sum(self.model.batch(getattr(b, "batch", b)) for b in share.batches)
            self.tokens += share.tokens

    def report(self, window_tokens: int, seconds: float, reduce_sum: Callable[[list[float]], list[float]]) -> dict[str, Any]:
        """{"flops_per_sec", "mfu"} of the window (every process calls it: the FLOPs are summed over them)."""
        if self.model is None:
            return {}
        flops = reduce_sum([self.flops])[0] if self.processes > 1 else self.flops
        if 0 < self.tokens < window_tokens:
            # Resumed inside this window: the steps before the checkpoint at this window's FLOPs per token.
            flops *= window_tokens / self.tokens
        self.flops, self.tokens = 0.0, 0
        rate = flops / max(seconds, 1e-9)
        out = {"flops_per_sec": rate}
        if self.peak is not None:
            out["mfu"] = rate / (self.peak.flops * self.processes)
        return out

    def run_fields(self) -> dict[str, Any]:
        """What the run record says: the model's FLOPs per token (linear layers and adapter, forward and backward)
        and the peak with where it came from."""
        if self.model is None:
            return {"flops_note": self.note} if self.note else {}
        return {"flops_per_token": self.model.per_token(), **(self.peak.fields() if self.peak else {}),
                **({"flops_note": self.note} if self.note else {})}
