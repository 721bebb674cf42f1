"""Attach a recipe's method to an mlx-lm model: mlx-lm's LoRA/DoRA layers, a soft prompt, or all weights.

Modules are chosen by `ftkit.targets.select` from the same paths the torch backend sees, and
adapter tensors cross in the common (PEFT) layout through `ftkit.adapter_layout`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from ftkit.adapters import layout as adapter_layout
from ftkit.common.errors import FtkitError


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer, quantized ones included, by Hugging Face module path."""
    shapes = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            out_dim, packed = module.weight.shape
            shapes[path] = (out_dim, packed * 32 // module.bits)
        elif isinstance(module, nn.Linear):
            shapes[path] = tuple(module.weight.shape)
    return shapes


def embed_tokens(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    emb = getattr(inner, "embed_tokens", None)
    if emb is None:
        raise FtkitError(f"{type(model).__module__}: no model.embed_tokens; soft prompts need it on the MLX backend.")
    return emb


class Tuned(nn.Module):
    """The base model, plus a soft prompt prepended to every sequence when there is one.

    The prompt's positions are dropped from the logits, so callers see one logit row per input token,
    as with PEFT's prompt tuning once its virtual positions are sliced off.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_virtual = 0

    def add_prompt(self, embeddings: mx.array) -> None:
        self.prompt_embeddings = embeddings
        self.n_virtual = int(embeddings.shape[0])

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        if not self.n_virtual:
            return self.model(inputs, cache=cache)
        if cache is not None and cache[0].offset > 0:
            return self.model(inputs, cache=cache)  # the prompt is already in the cache
        h = embed_tokens(self.model)(inputs)
        prompt = mx.broadcast_to(self.prompt_embeddings.astype(h.dtype), (h.shape[0], *self.prompt_embeddings.shape))
        logits = self.model(inputs, cache=cache, input_embeddings=mx.concatenate([prompt, h], axis=1))
        return logits[:, self.n_virtual :]


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
    new = [(path, layer_cls.from_base(found[path], r=ranks[path], dropout=dropout, scale=scale)) for path in modules]
    model.update_modules(tree_unflatten(new))


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
    lora = adapter_layout.parse_lora(tensors, kind, scale=0.0, dropout=0.0, where="adapter tensors")
    current = lora_params(tuned)
    native = adapter_layout.to_mlx(lora)
    unknown = sorted(set(native) - set(current))
    if unknown:
        raise FtkitError(f"adapter tensors the model does not hold: {unknown[:3]}")
    tuned.model.load_weights([(k, mx.array(v, dtype=current[k].dtype)) for k, v in native.items()], strict=False)


def fuse_lora(model: nn.Module, dequantize: bool) -> None:
    fused = [(path, m.fuse(dequantize=dequantize)) for path, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]
    if fused:
        model.update_modules(tree_unflatten(fused))
