"""LoRA on an mlx-lm mixture-of-experts block's routed experts, equal to PEFT's on transformers 5's.

mlx-lm stacks a block's experts in a `SwitchGLU` (`switch_mlp`) with separate gate, up and down
projections; transformers 5 fuses gate and up into one `gate_up_proj` parameter, and PEFT puts ONE
LoRA on it (one A per expert for gate and up together). `LoRASwitchGLU` does the same on MLX: a
shared-A LoRA on gate and up (`switch_mlp.gate_up_proj`), and mlx-lm's `LoRASwitchLinear` on
`switch_mlp.down_proj`. The core (`ftkit.adapters.experts`) converts names and layouts.

A fused model is written back in the per-expert layout `save_pretrained` writes for the family
(`hf_expert_weights`), which both transformers and mlx-lm read.
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    _gather_sort,
    _scatter_unsort,
)
from mlx_lm.tuner.lora import LoRASwitchLinear

from ftkit.adapters import experts as common
from ftkit.common.errors import FtkitError

# mlx-lm's expert projections -> the names `save_pretrained` writes per expert, where they differ.
_HF_EXPERT_NAMES = {"mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}}


class GateUpLoRA(nn.Module):
    """One LoRA per expert on gate and up together: a (experts, r, in), b (experts, 2 x hidden, r)."""

    def __init__(self, num_experts: int, in_dims: int, out_dims: int, r: int, scale: float):
        super().__init__()
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(num_experts, r, in_dims))
        self.lora_b = mx.zeros((num_experts, out_dims, r))
        self.scale = scale

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        z = mx.gather_mm(x, self.lora_a.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)
        return (self.scale * z).astype(x.dtype)


class LoRASwitchGLU(nn.Module):
    """mlx-lm's SwitchGLU with LoRA on gate+up (`gate_up_proj`) and/or down (`down_proj`)."""

    def __init__(self, glu: SwitchGLU):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.activation = glu.gate_proj, glu.up_proj, glu.down_proj, glu.activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # SwitchGLU.__call__, with the gate/up LoRA added before the activation
        x = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= 64
        idx, inv_order = indices, None
        if do_sort:
            x, idx, inv_order = _gather_sort(x, indices)
        x_up = self.up_proj(x, idx, sorted_indices=do_sort)
        x_gate = self.gate_proj(x, idx, sorted_indices=do_sort)
        if "gate_up_proj" in self:
            delta = self.gate_up_proj(x, idx, do_sort)
            half = x_gate.shape[-1]
            x_gate, x_up = x_gate + delta[..., :half], x_up + delta[..., half:]  # transformers: gate first
        x = self.down_proj(self.activation(x_up, x_gate), idx, sorted_indices=do_sort)
        if do_sort:
            x = _scatter_unsort(x, inv_order, indices.shape)
        return x.squeeze(-2)

    def fuse(self, dequantize: bool = False) -> SwitchGLU:
        n, hidden, d_in = _dims(self.gate_proj)
        glu = SwitchGLU(d_in, hidden, n, activation=self.activation)  # its fresh weights are replaced (and never computed: MLX is lazy)
        glu.up_proj, glu.gate_proj = self.up_proj, self.gate_proj
        glu.down_proj = self.down_proj.fuse(dequantize) if isinstance(self.down_proj, LoRASwitchLinear) else self.down_proj
        if "gate_up_proj" in self:
            lora = self.gate_up_proj
            delta = (lora.scale * lora.lora_b) @ lora.lora_a  # (experts, 2 x hidden, in)
            half = delta.shape[1] // 2
            glu.gate_proj = _add(self.gate_proj, delta[:, :half], dequantize)
            glu.up_proj = _add(self.up_proj, delta[:, half:], dequantize)
        return glu


def _add(linear: nn.Module, delta: mx.array, dequantize: bool) -> nn.Module:
    """A SwitchLinear holding `linear`'s weights plus `delta` (quantized again unless `dequantize`)."""
    quantized = isinstance(linear, QuantizedSwitchLinear)
    weight = linear.weight
    if quantized:
        weight = mx.dequantize(weight, linear.scales, linear.biases, group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    n, out_dims, in_dims = weight.shape
    fused = SwitchLinear(in_dims, out_dims, n, bias="bias" in linear)
    fused.weight = weight + delta.astype(weight.dtype)
    if "bias" in linear:
        fused.bias = linear.bias
    if quantized and not dequantize:
        fused = fused.to_quantized(group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    return fused


def _dims(linear: nn.Module) -> tuple[int, int, int]:
    return linear.num_experts, linear.output_dims, linear.input_dims


def blocks(model: nn.Module) -> dict[str, nn.Module]:
    """mlx-lm path -> every gated expert block (SwitchGLU, or one ftkit has adapted)."""
    return {path: m for path, m in model.named_modules() if isinstance(m, (SwitchGLU, LoRASwitchGLU))}


def shapes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """(experts, out, in) of every expert parameter as transformers 5 holds it, by its parameter path."""
    out = {}
    for path, glu in blocks(model).items():
        n, hidden, d_in = _dims(glu.gate_proj)
        module = common.hf_name(path)
        out[f"{module}.gate_up_proj"] = (n, 2 * hidden, d_in)
        out[f"{module}.down_proj"] = (n, d_in, hidden)
    return out


def attach(model: nn.Module, params: list[str], ranks: dict[str, int], scale: float) -> None:
    """LoRA on these expert parameters (transformers paths), with the recipe's rank and scale; without
    dropout, as PEFT (the core refuses a recipe that asks for it)."""
    natives = {common.hf_name(p): p for p in blocks(model)}
    new = []
    for module, names in _by_module(params).items():
        if module not in natives:
            raise FtkitError(f"{module}: no mixture-of-experts block there in this MLX model.")
        glu = LoRASwitchGLU(blocks(model)[natives[module]])
        if "down_proj" in names:
            glu.down_proj = LoRASwitchLinear.from_base(glu.down_proj, r=ranks[f"{module}.down_proj"], dropout=0.0, scale=scale)
        if "gate_up_proj" in names:
            n, hidden, d_in = _dims(glu.gate_proj)
            glu.gate_up_proj = GateUpLoRA(n, d_in, 2 * hidden, ranks[f"{module}.gate_up_proj"], scale)
        new.append((natives[module], glu))
    model.update_modules(tree_unflatten(new))


def _by_module(params: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in params:
        module, name = common.split(p)
        out.setdefault(module, []).append(name)
    return out


def fuse(model: nn.Module, dequantize: bool) -> None:
    fused = [(path, m.fuse(dequantize)) for path, m in model.named_modules() if isinstance(m, LoRASwitchGLU)]
    if fused:
        model.update_modules(tree_unflatten(fused))


def hf_expert_weights(weights: dict[str, mx.array], model_type: str | None) -> dict[str, mx.array]:
    """mlx-lm's stacked `switch_mlp` weights -> one tensor per expert, named as `save_pretrained` names
    them (`mlp.experts.3.up_proj.weight`; Mixtral: `block_sparse_moe.experts.3.w3.weight`), the
    layout transformers reads (it ignores stacked names and would start the experts from random)."""
    rename = _HF_EXPERT_NAMES.get(model_type or "", {})
    out = {}
    for key, value in weights.items():
        prefix, sep, rest = key.partition(".switch_mlp.")
        if not sep:
            out[key] = value
            continue
        proj, _, kind = rest.partition(".")
        for e in range(value.shape[0]):
            out[f"{prefix}.experts.{e}.{rename.get(proj, proj)}.{kind}"] = value[e]
    return out
