"""Attach a recipe's method to an mlx-lm model: mlx-lm's LoRA/DoRA layers, a soft prompt, or all weights.

Modules are chosen by `ftkit.targets.select` from the same paths the torch backend sees, and
adapter tensors cross in the common (PEFT) layout through `ftkit.adapter_layout`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from ftkit.adapters import layout as adapter_layout
from ftkit.adapters.targets import is_expert
from ftkit.common.errors import FtkitError
from ftkit_mlx import experts


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """(out, in) of every linear layer, quantized ones included, by Hugging Face module path; and
    (experts, out, in) of every MoE block's expert parameters, by transformers 5 parameter path."""
    shapes = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            out_dim, packed = module.weight.shape
            shapes[path] = (out_dim, packed * 32 // module.bits)
        elif isinstance(module, nn.Linear):
            shapes[path] = tuple(module.weight.shape)
    return {**shapes, **experts.shapes(model)}


def embed_tokens(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    emb = getattr(inner, "embed_tokens", None)
    if emb is None:
        family = type(model).__module__.rsplit(".", 1)[-1]
        raise FtkitError(f"model family '{family}' (mlx-lm's {type(model).__module__}) has no model.embed_tokens, where the "
                         "MLX backend feeds a soft prompt in; use method.kind = 'lora', or --backend torch.")
    return emb


def check_prompt_family(model_path: Path) -> None:
    """Refuse a family that cannot take a soft prompt before any weight is read: mlx-lm's model class,
    built with lazy arrays (nothing computed or allocated), must have `model.embed_tokens`."""
    from mlx_lm.utils import _get_classes, load_config

    from ftkit_mlx.model_io import model_overrides

    try:
        config = load_config(model_path)
        config = {**config, **model_overrides(config)}
        model_cls, args_cls = _get_classes(config)
        skeleton = model_cls(args_cls.from_dict(config))
    except Exception:  # noqa: BLE001 - an unloadable folder: loading says why, in its own words
        return
    embed_tokens(skeleton)


# Families whose transformers embedding module scales its output by sqrt(hidden_size) (Gemma's scaled
# word embedding), where mlx-lm scales after the lookup, in the decoder's forward; True where mlx-lm
# rounds that factor to bfloat16 first. PEFT puts a soft prompt in place of the embedding module's
# output, so a prompt holds scaled rows, and on MLX it is divided by mlx-lm's factor on its way in.
# (Granite's embedding_multiplier comes after the embedding module in both libraries: it scales the
# prompt on both, nothing to undo. The other families do not scale.)
_SCALED_AFTER_LOOKUP = {"gemma": False, "gemma2": False, "gemma3_text": True}


def embedding_scales(model: nn.Module) -> tuple[float, float]:
    """(transformers', mlx-lm's) factor on looked-up embeddings before they enter the first block, for
    the families above; (1, 1) for the rest, whose embedding output is what the blocks see."""
    bf16 = _SCALED_AFTER_LOOKUP.get(type(model).__module__.rsplit(".", 1)[-1])
    if bf16 is None:
        return 1.0, 1.0
    exact = model.model.args.hidden_size**0.5
    return exact, (mx.array(exact, mx.bfloat16).item() if bf16 else exact)


class PromptedEmbedding(nn.Module):
    """Stands in for the model's embedding during one forward pass with a soft prompt: the first
    `n_virtual` ids are placeholders, and their rows are the prompt's; the rest are looked up.

    Going through the embedding module rather than an `input_embeddings=` argument works for every
    mlx-lm family (most do not take that argument), and whatever the family does after the lookup
    (scaling, masks, positions over n_virtual + T tokens) applies to the prompt as PEFT's does on torch.
    """

    def __init__(self, inner: nn.Module, rows: mx.array):
        super().__init__()
        self.inner = inner
        self.rows = rows

    def __call__(self, ids: mx.array) -> mx.array:
        n = self.rows.shape[0]
        h = self.inner(ids[:, n:])
        prompt = mx.broadcast_to(self.rows.astype(h.dtype), (h.shape[0], *self.rows.shape))
        return mx.concatenate([prompt, h], axis=1)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.inner.as_linear(x)  # tied output heads read the embedding in the same forward

    @property
    def weight(self) -> mx.array:
        return self.inner.weight  # some tied heads multiply by the table itself (MiniCPM, Seed-OSS)


class Tuned(nn.Module):
    """The base model, plus a soft prompt prepended to every sequence when there is one.

    The prompt's positions are dropped from the logits, so callers see one logit row per input token,
    as with PEFT's prompt tuning once its virtual positions are sliced off. `prompt_embeddings` holds
    the rows PEFT holds: embeddings as transformers' embedding module returns them (scaled for Gemma).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_virtual = 0

    def add_prompt(self, embeddings: mx.array) -> None:
        embed_tokens(self.model)  # a family without one fails here, before any step
        self.prompt_embeddings = embeddings
        self.n_virtual = int(embeddings.shape[0])

    def embedding_rows(self, ids: mx.array) -> mx.array:
        """Token embeddings in the prompt's space (what PEFT's word embeddings return for `ids`)."""
        return embed_tokens(self.model)(ids) * embedding_scales(self.model)[0]

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """Logits, one row per input token."""
        return self._prompted(self.model, inputs, cache)

    def hidden_states(self, inputs: mx.array, cache=None) -> mx.array:
        """The decoder's final hidden states, one row per input token: what the output head reads, so
        that the head can run at the target positions only (the prompt's never get logits)."""
        return self._prompted(self.model.model, inputs, cache)

    def _prompted(self, forward, inputs: mx.array, cache) -> mx.array:
        """`forward` over the prompt's n_virtual positions, then the inputs (one sequence: positions,
        masks and windows span both, as with PEFT), the prompt's rows dropped from the output."""
        if not self.n_virtual or (cache is not None and cache[0].offset > 0):
            return forward(inputs, cache=cache)  # no prompt, or it is already in the cache
        placeholders = mx.zeros((inputs.shape[0], self.n_virtual), inputs.dtype)
        with self._prompt_in_embedding():
            out = forward(mx.concatenate([placeholders, inputs], axis=1), cache=cache)
        return out[:, self.n_virtual :]

    @contextmanager
    def _prompt_in_embedding(self):
        """The model's embedding swapped for a `PromptedEmbedding` for one call, then put back, so
        the model's parameter tree (saving, fusing, LoRA paths) never sees the wrapper."""
        decoder, original = self.model.model, embed_tokens(self.model)
        scale = embedding_scales(self.model)[1]
        rows = self.prompt_embeddings if scale == 1.0 else self.prompt_embeddings / scale
        decoder.embed_tokens = PromptedEmbedding(original, rows)
        try:
            yield
        finally:
            decoder.embed_tokens = original


def output_head(tuned: Tuned):
    """The module that turns mlx-lm's final hidden states into logits: `lm_head`, or the tied input
    embeddings; None when the model has neither (the backend then asks for full logits)."""
    model = tuned.model
    if not hasattr(getattr(model, "model", None), "__call__"):
        return None
    if "lm_head" in model:
        return model.lm_head
    emb = getattr(model.model, "embed_tokens", None)
    return emb.as_linear if emb is not None and hasattr(emb, "as_linear") else None


class PackedAttention:
    """Stands in for mlx-lm's per-layer KV cache during a packed forward pass.

    mlx-lm models ask the cache for their attention mask (`make_mask`) and for the RoPE offset; this
    one answers with a block-diagonal causal mask (attention stays inside each packed example) and
    offset 0, and stores nothing. Positions need no restart per example: RoPE scores depend only on
    the distance between two tokens, and no token sees another example.
    """

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        if window_size is None:
            return self.mask
        q, k = mx.arange(n)[:, None], mx.arange(n)[None, :]
        return mx.logical_and(self.mask, (q - k) < window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


def packed_attention(positions: np.ndarray, n_layers: int) -> list[PackedAttention]:
    """The cache list for `Tuned.__call__` that keeps attention inside each example of packed rows."""
    from ftkit.data.packing import segment_ids

    seg = segment_ids(positions)
    causal = np.tril(np.ones((positions.shape[1],) * 2, dtype=bool))
    mask = (seg[:, :, None] == seg[:, None, :]) & causal  # [B, T, T]
    return [PackedAttention(mx.array(mask[:, None]))] * n_layers  # one object: it holds no state


def attach_lora(model: nn.Module, modules: list[str], ranks: dict[str, int], scale: float, dropout: float, dora: bool) -> None:
    layer_cls = DoRALinear if dora else LoRALinear
    found = dict(model.named_modules())
    new = [(path, layer_cls.from_base(found[path], r=ranks[path], dropout=dropout, scale=scale)) for path in modules if not is_expert(path)]
    model.update_modules(tree_unflatten(new))
    experts.attach(model, [p for p in modules if is_expert(p)], ranks, scale)


def lora_params(tuned: Tuned) -> dict[str, mx.array]:
    """The adapter's parameters under their mlx-lm names (relative to the base model)."""
    return {k[len("model."):]: v for k, v in tree_flatten(tuned.trainable_parameters()) if k.startswith("model.")}


def lora_adapter(tuned: Tuned, kind: str, scale: float, dropout: float) -> adapter_layout.LoraAdapter:
    native = {k: np.array(v.astype(mx.float32)) for k, v in lora_params(tuned).items()}
    return adapter_layout.from_mlx(native, kind, scale, dropout)


def to_common(tuned: Tuned, kind: str, scale: float, dropout: float) -> dict[str, np.ndarray]:
    if kind == "prompt":
        return {"prompt_embeddings": np.array(tuned.prompt_embeddings.astype(mx.float32))}
    return adapter_layout.lora_tensors(lora_adapter(tuned, kind, scale, dropout))


def from_common(tuned: Tuned, kind: str, tensors: dict[str, np.ndarray]) -> None:
    if kind == "prompt":
        tuned.add_prompt(mx.array(tensors["prompt_embeddings"], dtype=mx.float32))
        return
    current = lora_params(tuned)
    lora = adapter_layout.parse_lora(tensors, kind, scale=0.0, dropout=0.0, where="adapter tensors",
                                     expert_counts=adapter_layout.mlx_expert_counts(current))
    native = adapter_layout.to_mlx(lora, list(current))
    unknown = sorted(set(native) - set(current))
    if unknown:
        raise FtkitError(f"adapter tensors the model does not hold: {unknown[:3]}")
    tuned.model.load_weights([(k, mx.array(v, dtype=current[k].dtype)) for k, v in native.items()], strict=False)


def fuse_lora(model: nn.Module, dequantize: bool) -> None:
    fused = [(path, m.fuse(dequantize=dequantize)) for path, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]
    if fused:
        model.update_modules(tree_unflatten(fused))
    experts.fuse(model, dequantize)
