"""DPO and ORPO on the MLX backend: each sequence's summed log-probability, the frozen reference, the pair step.

The formulas are the core's (`ftkit.backend.objectives.pair_terms`, fed MLX ops here); this module only runs
the model. Per-token losses come from the backend's SFT path (`MlxBackend._token_losses`: the same inputs, masks,
packed attention and head-at-targets), and a one-hot [tokens, sequences] matmul sums them per sequence.

The reference never holds a second model for LoRA/DoRA: its passes run the policy's own modules with the adapter
bypassed (each adapted layer swapped for its base layer for one forward, so DoRA off is the base linear itself,
not m * W / ||W||), or with a starting adapter's arrays swapped in for the adapter's; `full` keeps a frozen copy
of the starting weights and swaps those in. Reference passes run in eval mode (no dropout) and outside the
gradient, so nothing flows back into them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

from ftkit.adapters import layout as adapter_layout
from ftkit.backend.objectives import Ops, Preference, pair_terms
from ftkit.common.errors import FtkitError
from ftkit.data.batch import PairBatch
from ftkit_mlx import experts, methods, model_io
from ftkit_mlx.step import Arrays, batch_arrays

if TYPE_CHECKING:
    from ftkit_mlx.backend import MlxBackend

OPS = Ops(log_sigmoid=nn.log_sigmoid, log1mexp=lambda x: mx.log(-mx.expm1(x)),
          greater=lambda a, b: (a > b).astype(mx.float32), stop_gradient=mx.stop_gradient)

_ADAPTED = (LoRALinear, DoRALinear, LoRASwitchLinear)


class Reference:
    """What a reference pass runs: the policy's modules with the adapter bypassed (`params` None), or with
    these arrays (mlx-lm names under the model) swapped in for the policy's."""

    def __init__(self, description: str, params: dict[str, mx.array] | None = None):
        self.description = description
        self.params = params

    @contextmanager
    def active(self, backend: "MlxBackend") -> Iterator[None]:
        with _eval_mode(backend.tuned):
            if self.params is None:
                with adapter_off(backend):
                    yield
            else:
                with swapped(backend.tuned.model, self.params):
                    yield


@contextmanager
def _eval_mode(tuned: nn.Module) -> Iterator[None]:
    was = tuned.training
    tuned.train(False)
    try:
        yield
    finally:
        tuned.train(was)


@contextmanager
def adapter_off(backend: "MlxBackend") -> Iterator[None]:
    """The base model for one pass: every LoRA/DoRA layer replaced by the base layer it wraps, every expert
    block's gate/up LoRA taken out (the block then computes mlx-lm's SwitchGLU), then all put back."""
    model = backend.tuned.model
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, _ADAPTED)]
    blocks = [m for _, m in model.named_modules() if isinstance(m, experts.LoRASwitchGLU) and "gate_up_proj" in m]
    head = backend.head
    if layers:
        model.update_modules(tree_unflatten([(p, m.linear) for p, m in layers]))
    held = [(b, b.pop("gate_up_proj")) for b in blocks]
    if isinstance(head, _ADAPTED):  # an adapted output head (method.targets naming lm_head)
        backend.head = head.linear
    try:
        yield
    finally:
        backend.head = head
        for b, lora in held:
            b.gate_up_proj = lora
        if layers:
            model.update_modules(tree_unflatten(layers))


@contextmanager
def swapped(model: nn.Module, params: dict[str, mx.array]) -> Iterator[None]:
    current = dict(tree_flatten(model.parameters()))
    model.update(tree_unflatten(list(params.items())), strict=False)
    try:
        yield
    finally:
        model.update(tree_unflatten([(k, current[k]) for k in params]), strict=False)


# ---------------------------------------------------------------------------------------------- the reference
def make_reference(backend: "MlxBackend", source: Path | None) -> Reference:
    if backend.kind == "prompt":
        raise FtkitError("preference tuning (train.objective dpo/orpo) needs method.kind lora, dora or full; a soft prompt has no reference here.")
    if backend.kind == "full":
        return _model_reference(backend, source)
    if source is None:
        return Reference("the base model with the adapter switched off")
    return _adapter_reference(backend, Path(source))


def _adapter_reference(backend: "MlxBackend", folder: Path) -> Reference:
    """A common-format adapter's arrays, frozen, shaped as the policy's adapter so that they swap in."""
    with adapter_off(backend):
        shapes = methods.linear_shapes(backend.tuned.model)
    config, weights = adapter_layout.open_for(folder, shapes, backend.hidden)
    kind = adapter_layout.adapter_kind(config)
    if not isinstance(weights, adapter_layout.LoraAdapter) or kind != backend.kind:
        raise FtkitError(f"{folder}: a {kind} adapter cannot be the reference of a {backend.kind} run; "
                         f"the reference adapter must be of the trained method (the adapter the run started from).")
    current = methods.lora_params(backend.tuned)
    native = adapter_layout.to_mlx(weights, list(current))
    wrong = sorted(k for k in set(native) | set(current) if k not in native or k not in current or native[k].shape != current[k].shape)
    if wrong:
        raise FtkitError(f"{folder}: the reference adapter does not adapt the same modules with the same rank as the trained "
                         f"adapter (first difference: {wrong[0]}); use the adapter the run started from (method.resume_from).")
    # The layers multiply B by the policy's scale (alpha / r); a reference with another alpha is rescaled into B.
    ratio = weights.scale / backend.scale
    params = {k: mx.array(v * ratio if k.endswith("lora_b") else v, dtype=current[k].dtype) for k, v in native.items()}
    mx.eval(params)
    return Reference(f"the adapter {folder}, frozen", params)


def _model_reference(backend: "MlxBackend", folder: Path | None) -> Reference:
    """`full`: a frozen copy of the starting weights (a second set of weights in memory)."""
    recipe = backend.recipe
    if folder is None:
        from ftkit.models.resolve import resolve_model

        folder = resolve_model(recipe.model.path, recipe.model.revision)
    model, _ = model_io.load_base(Path(folder), recipe.model.trust_remote_code, recipe.data.max_seq_length)
    current = dict(tree_flatten(backend.tuned.model.parameters()))
    loaded = dict(tree_flatten(model.parameters()))
    if set(loaded) != set(current) or any(loaded[k].shape != v.shape for k, v in current.items()):
        raise FtkitError(f"{folder}: its weights are not those of the trained model's architecture; the reference of a "
                         "full fine-tuning run must be the model it starts from.")
    params = {k: v.astype(current[k].dtype) for k, v in loaded.items()}
    mx.eval(params)
    return Reference(f"a frozen copy of the model at {folder}", params)


# ---------------------------------------------------------------------------------------------- the passes
def _segments(pb: PairBatch, selected: mx.array | None) -> mx.array:
    """[tokens, sequences] one-hot of each per-token loss's sequence (-1, padding and prompts: a zero row), in the
    order `_token_losses` returns them (flattened)."""
    seq = pb.sequence.reshape(-1)
    if selected is not None:  # batch_arrays' flat target positions, unpadded
        seq = seq[pb.batch.mask.reshape(-1) > 0]
    return mx.array((seq[:, None] == np.arange(2 * pb.n_pairs)[None, :]).astype(np.float32))


def _logps(backend: "MlxBackend", arrays: Arrays, segments: mx.array) -> mx.array:
    """Each sequence's summed target-token log-probability, [2 x pairs] float32."""
    return -(backend._token_losses(backend.tuned, *arrays).reshape(-1) @ segments)


def reference_of(backend: "MlxBackend") -> Reference:
    """The reference `set_reference` set; the default (None) when it was not called."""
    if backend.reference is None:
        backend.set_reference(None)
    return backend.reference


def sequence_logps(backend: "MlxBackend", pb: PairBatch, reference: bool) -> np.ndarray:
    arrays = step_arrays(backend, pb)
    segments = _segments(pb, arrays.selected)
    with reference_of(backend).active(backend) if reference else _eval_mode(backend.tuned):
        out = _logps(backend, arrays, segments)
    mx.eval(out)
    return np.array(out).astype(np.float64)


def step_arrays(backend: "MlxBackend", pb: PairBatch) -> Arrays:
    """The SFT step's arrays of the pair batch's rows (eager: no bucket padding)."""
    return batch_arrays(pb.batch, backend.head is not None)[0]


def pair_forward_backward(backend: "MlxBackend", pb: PairBatch, scale: float) -> dict[str, mx.array]:
    """Add the gradients of scale x the summed pair loss to the step's (those `optimizer_step` applies);
    return the sums over the batch's pairs of "loss" and every metric."""
    pref = Preference.of(backend.recipe.train)
    if pref is None:
        raise FtkitError("pair_forward_backward: the recipe's train.objective is 'sft'; set 'dpo' or 'orpo' for preference data.")
    arrays = step_arrays(backend, pb)
    segments = _segments(pb, arrays.selected)
    ref = None
    if pref.uses_reference:
        with reference_of(backend).active(backend):
            ref = mx.stop_gradient(_logps(backend, arrays, segments))
        mx.eval(ref)  # its activations are freed before the policy's forward and backward hold theirs
    n = mx.array(pb.tokens_per_sequence.astype(np.float32))

    def objective():
        lp = _logps(backend, arrays, segments)  # the policy, dropout as in training
        refs = (None, None) if ref is None else (ref[0::2], ref[1::2])
        terms = pair_terms(OPS, pref, lp[0::2], lp[1::2], n[0::2], n[1::2], *refs)
        sums = {k: v.sum() for k, v in terms.items()}
        return sums["loss"] * scale, sums

    (_, sums), grads = nn.value_and_grad(backend.tuned, objective)()
    step = backend.step
    step.grads = grads if step.grads is None else tree_map(mx.add, step.grads, grads)
    mx.eval(sums, step.grads)
    return sums
