"""LoRA on a mixture-of-experts block's routed experts, in PEFT's layout and mlx-lm's.

transformers 5 keeps a block's experts as two 3-D parameters of one module `...mlp.experts`:
`gate_up_proj` (experts, 2 x intermediate, hidden) and `down_proj` (experts, hidden, intermediate).
PEFT adapts them with `target_parameters`: one `ParamWrapper` per parameter, nested in the order the
module registers them (the last one outermost), so the tensor names say which parameter by depth:

    gate_up_proj and down_proj:  <experts>.base_layer.lora_A.weight (gate_up), <experts>.lora_A.weight (down)
    one of them:                 <experts>.lora_A.weight

and each expert's factors sit in one matrix: A (experts x r, in), expert-major; B (out, r x experts),
where B[:, j * experts + e] is column j of expert e. ftkit holds an expert LoRA per expert, as mlx-lm
does: a (experts, r, in), b (experts, out, r).

mlx-lm stacks the experts of `...switch_mlp` (Mixtral's block is `block_sparse_moe`, transformers 5's
`mlp`) with separate gate and up projections; ftkit's MLX layers put one LoRA on gate and up together,
as PEFT does on `gate_up_proj`, under `<switch_mlp>.gate_up_proj` and `<switch_mlp>.down_proj`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ftkit.adapters.targets import EXPERT_PARAMS, block_index, is_expert
from ftkit.common.errors import AdapterMismatchError

BASE_LAYER = ".base_layer"

# mlx-lm's module names that transformers 5 spells otherwise, for the experts and their block.
_MLX_TO_HF = {"switch_mlp": "experts", "block_sparse_moe": "mlp"}


def split(param_path: str) -> tuple[str, str]:
    """`...mlp.experts.down_proj` -> (`...mlp.experts`, `down_proj`)."""
    module, _, name = param_path.rpartition(".")
    return module, name


def targeted_on(module: str, params: Iterable[str]) -> list[str]:
    """The expert parameters of `module` among `params`, in PEFT's nesting order."""
    have = set(params)
    return [p for p in EXPERT_PARAMS if f"{module}.{p}" in have]


def peft_module(param_path: str, all_params: Iterable[str]) -> str:
    """The PEFT module name that holds this parameter's LoRA, given every adapted expert parameter."""
    module, name = split(param_path)
    order = targeted_on(module, all_params)
    return module + BASE_LAYER * (len(order) - 1 - order.index(name))


def strip_base_layer(module: str) -> tuple[str, int]:
    depth = 0
    while module.endswith(BASE_LAYER):
        module, depth = module[: -len(BASE_LAYER)], depth + 1
    return module, depth


def resolve(peft_modules: Iterable[str], targeted: Iterable[str], where: str) -> dict[str, str]:
    """PEFT module names (`...experts.base_layer`) -> the expert parameter each adapts, given which
    parameters the adapter targets (its target_parameters, or what a model holds)."""
    targeted = list(targeted)
    by_module: dict[str, set[int]] = {}
    for m in peft_modules:
        module, depth = strip_base_layer(m)
        by_module.setdefault(module, set()).add(depth)
    out = {}
    for module, depths in by_module.items():
        order = targeted_on(module, targeted)
        if depths != set(range(len(order))):
            raise AdapterMismatchError(
                f"{where}: expert LoRA tensors under {module} at {len(depths)} depth(s), but its target_parameters name "
                f"{order or 'none of ' + str(list(EXPERT_PARAMS))}: the tensors and adapter_config.json disagree."
            )
        for depth in depths:
            out[module + BASE_LAYER * depth] = f"{module}.{order[len(order) - 1 - depth]}"
    return out


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert a (E, r, in), b (E, out, r) -> PEFT's A (E*r, in), B (out, r*E)."""
    n, r, d_in = a.shape
    return a.reshape(n * r, d_in), np.ascontiguousarray(b.transpose(1, 2, 0).reshape(b.shape[1], r * n))


def from_peft(a: np.ndarray, b: np.ndarray, n: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's A (E*r, in), B (out, r*E) -> per-expert a (E, r, in), b (E, out, r), for `n` experts."""
    if a.shape[0] % n or b.shape[1] != a.shape[0]:
        raise AdapterMismatchError(f"{where}: lora_A {a.shape} and lora_B {b.shape} do not split into {n} experts.")
    r = a.shape[0] // n
    return a.reshape(n, r, a.shape[1]), np.ascontiguousarray(b.reshape(b.shape[0], r, n).transpose(2, 0, 1))


def parameter_spec(params: list[str], all_layers: int | None) -> list[str] | None:
    """PEFT's target_parameters for exactly these expert parameters: block-relative names
    ("mlp.experts.down_proj") when every block has them all, full paths otherwise (PEFT applies no
    layers_to_transform to parameters)."""
    if not params:
        return None
    relative = {p.split(f"layers.{block_index(p)}.", 1)[1] for p in params}
    if all_layers and len(params) == len(relative) * all_layers and {block_index(p) for p in params} == set(range(all_layers)):
        return sorted(relative)
    return sorted(params)


def in_config(config_params: list[str], module: str) -> list[str]:
    """The parameters of expert module `module` that a config's target_parameters name (PEFT's rule:
    equal, or a dotted suffix)."""
    return [f"{module}.{p}" for p in EXPERT_PARAMS
            if any(f"{module}.{p}" == t or f"{module}.{p}".endswith("." + t) for t in config_params)]


def hf_name(native: str) -> str:
    """An mlx-lm module path inside a MoE block -> its transformers 5 path."""
    parts = native.split(".")
    if "switch_mlp" not in parts:
        return native
    return ".".join(_MLX_TO_HF.get(p, p) for p in parts)


def is_native_expert(native_module: str) -> bool:
    return is_expert(hf_name(native_module))


def native_names(common_modules: Iterable[str], native_modules: Iterable[str]) -> dict[str, str]:
    """Common (HF) expert module paths -> this MLX model's own; mlx-lm's usual `switch_mlp` spelling
    where the model is not given."""
    known = {hf_name(n): n for n in native_modules}
    return {m: known.get(m, m.replace(".experts.", ".switch_mlp.")) for m in common_modules}
