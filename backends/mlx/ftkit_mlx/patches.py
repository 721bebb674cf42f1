"""The changes ftkit makes to a loaded mlx-lm model so that it computes what transformers computes:
the sliding windows and RoPEs that `ftkit.models.mlx_config.plan` lists per layer (the why is there).

Nothing here adds or renames a parameter: a RoPE holds no trainable weights (its frequencies are
private arrays), and the attention modules keep their object and their children; only their class
becomes a subclass that narrows the mask to the window before the original forward runs. Adapter
paths, checkpoints and saved weights stay those of the unpatched model.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ftkit.common.errors import FtkitError
from ftkit.models.mlx_config import LayerPatch, MlxPlan, Rope
from ftkit_mlx.methods import PackedAttention


class LongRoPE(nn.Module):
    """LongRoPE as transformers computes it: the short factors while the sequence (the largest
    position + 1) fits the original context, the long ones past it, and the attention factor on the
    rotated part either way. (mlx-lm's SuScaledRoPE applies the long factors at every length.)"""

    def __init__(self, dims: int, rope: Rope, traditional: bool = False):
        super().__init__()
        scaling = rope.scaling
        self.dims, self.traditional = dims, traditional
        self.original = int(scaling["original_max_position_embeddings"])
        self.attention_factor = float(scaling["attention_factor"])
        base = rope.theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        # private names: frequencies, not parameters (an optimizer or a saved model never sees them)
        self._short = mx.array(scaling["short_factor"], dtype=mx.float32) * base
        self._long = mx.array(scaling["long_factor"], dtype=mx.float32) * base
        self.length: int | None = None  # a packed batch's longest example, set by the attention

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        length = self.length or int(offset) + x.shape[-2]
        freqs = self._long if length > self.original else self._short
        if self.attention_factor != 1.0:
            x = x.at[..., : self.dims].multiply(self.attention_factor)
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset, freqs=freqs)


def build_rope(rope: Rope, current: nn.Module, max_position_embeddings: int | None) -> nn.Module:
    """`rope` as a module with the rotated width and layout of the one mlx-lm built (`current`)."""
    from mlx_lm.models.rope_utils import initialize_rope

    dims = getattr(current, "dims", None) or getattr(current, "dim", None)
    if dims is None:
        raise FtkitError(f"{type(current).__name__}: not a RoPE module ftkit can replace; use --backend torch for this model.")
    traditional = bool(getattr(current, "traditional", False))
    if rope.kind == "longrope":
        return LongRoPE(int(dims), rope, traditional)
    scaling = dict(rope.scaling) if rope.scaling else None
    module = initialize_rope(int(dims), rope.theta, traditional, scaling, max_position_embeddings)
    if rope.kind == "yarn" and "attention_factor" in scaling:
        module.mscale = float(scaling["attention_factor"])  # transformers' cos/sin factor, given not derived
    return module


def windowed_mask(mask: Any, n: int, cache: Any, window: int) -> Any:
    """`mask` (None, "causal" or an array over the cached and new keys) narrowed to keys fewer than
    `window` positions behind each query, as transformers' sliding-window mask."""
    offset = int(getattr(cache, "offset", 0) or 0)
    if isinstance(mask, mx.array):
        q_len, k_len = mask.shape[-2], mask.shape[-1]
        if k_len <= window:
            return mask
        q = mx.arange(k_len - q_len, k_len)[:, None]
        band = (q - mx.arange(k_len)[None]) < window
        if mask.dtype == mx.bool_:
            return mx.logical_and(mask, band)
        return mx.where(band, mask, mx.array(mx.finfo(mask.dtype).min, mask.dtype))
    if offset + n <= window:
        return mask
    from mlx_lm.models.base import create_causal_mask

    return create_causal_mask(n, offset, window_size=window)


def packed_length(cache: Any) -> int | None:
    """For a packed batch, the sequence length transformers sees: the largest position + 1 (positions
    restart per example), which is the longest row of the block-diagonal mask."""
    if not isinstance(cache, PackedAttention):
        return None
    length = getattr(cache, "_ftkit_length", None)
    if length is None:
        length = cache._ftkit_length = int(cache.mask.sum(axis=-1).max().item())  # one object for all layers
    return length


# mlx-lm attentions that add the mask to scores shaped [B, kv heads, queries per kv head, L, S]
# themselves: a packed batch's [B, 1, L, S] mask would meet the kv heads on its batch axis (silently
# wrong when B equals their number).
GROUPED_SCORES = ("gemma2",)


class _Patched:
    """Mixed in before an mlx-lm attention class: the window, the mask's axes and the packed length,
    then its forward."""

    _ftkit_window: int | None = None
    _ftkit_grouped = False

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None, *args, **kwargs):
        if self._ftkit_window is not None:
            mask = windowed_mask(mask, x.shape[1], cache, self._ftkit_window)
        if self._ftkit_grouped and isinstance(mask, mx.array) and mask.ndim == 4 and getattr(self, "repeats", 1) > 1:
            mask = mx.expand_dims(mask, 2)
        rope = getattr(self, "rope", None)
        if not isinstance(rope, LongRoPE):
            return super().__call__(x, mask, cache, *args, **kwargs)
        rope.length = packed_length(cache)
        try:
            return super().__call__(x, mask, cache, *args, **kwargs)
        finally:
            rope.length = None


_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if issubclass(cls, _Patched):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_Patched, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def _patch_layer(attn: nn.Module, patch: LayerPatch, grouped: bool, max_position_embeddings: int | None) -> None:
    if patch.rope is not None:
        attn.rope = build_rope(patch.rope, attn.rope, max_position_embeddings)
    if patch.window is not None or grouped or isinstance(getattr(attn, "rope", None), LongRoPE):
        attn.__class__ = _patched_class(type(attn))
        attn._ftkit_window = patch.window
        attn._ftkit_grouped = grouped


def apply(model: nn.Module, plan: MlxPlan) -> None:
    """Install the plan's windows and RoPEs in `model` (in place)."""
    grouped = plan.family in GROUPED_SCORES
    if not plan.patches and not grouped:
        return
    layers = model.layers
    for i in range(len(layers)) if grouped else sorted(plan.patches):
        attn = getattr(layers[i], "self_attn", None)
        if attn is None or not hasattr(attn, "rope"):
            raise FtkitError(f"{plan.family}: layer {i} has no self_attn.rope in mlx-lm's model, so ftkit cannot give it "
                             "transformers' window or RoPE; use --backend torch for this model.")
        _patch_layer(attn, plan.patches.get(i, LayerPatch()), grouped, plan.max_position_embeddings)


def _exact_scale_class(cls: type) -> type:
    def __call__(self, x: mx.array) -> mx.array:
        h = cls.__call__(self, x)
        if h.dtype == mx.bfloat16:  # both libraries round the scale to bfloat16 then
            return h
        return h * (mx.array(self.ftkit_scale, h.dtype) / mx.array(self.ftkit_scale, mx.bfloat16).astype(h.dtype))

    return type(f"ExactScale{cls.__name__}", (cls,), {"__call__": __call__})


def exact_embedding_scale(model: nn.Module, config: dict[str, Any]) -> None:
    """mlx-lm's Gemma 3 multiplies the embeddings by sqrt(hidden) rounded to bfloat16 whatever the
    model's dtype, transformers by sqrt(hidden) in the weights' dtype (0.3% apart at hidden 2560 in
    fp32): the lookup carries the ratio. A class swap, so parameter paths and the tied head stay."""
    if config.get("model_type") != "gemma3_text":
        return
    emb = model.model.embed_tokens
    emb.ftkit_scale = float(config["hidden_size"]) ** 0.5
    emb.__class__ = _exact_scale_class(type(emb))
