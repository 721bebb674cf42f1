"""The common adapter folder's tensors and config, and the conversions to and from MLX's layout.

The common folder is PEFT's: `adapter_config.json` + `adapter_model.safetensors`, keys such as
`base_model.model.<module>.lora_A.weight` (r, in), `...lora_B.weight` (out, r),
`...lora_magnitude_vector` (out,) for DoRA, and `prompt_embeddings` (n, hidden) for soft prompts.
MLX (mlx-lm's layers) keeps `<module>.lora_a` (in, r), `<module>.lora_b` (r, out), `<module>.m`,
and a `scale` where PEFT keeps `lora_alpha / r`. Module paths are the Hugging Face names, which
mlx-lm's Llama/Mistral/Qwen/Phi/Gemma definitions share. A mixture-of-experts block's routed
experts are adapted per parameter (PEFT's target_parameters); `ftkit.adapters.experts` holds their layouts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftkit.adapters import experts
from ftkit.adapters.targets import block_index, is_expert, select
from ftkit.common.errors import AdapterMismatchError
from ftkit.common.tensors import read_safetensors, write_safetensors

PEFT_PREFIX = "base_model.model."


PEFT_WEIGHTS = "adapter_model.safetensors"


PEFT_CONFIG = "adapter_config.json"


MLX_LM_WEIGHTS = "adapters.safetensors"


_LORA_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")


@dataclass
class LoraAdapter:
    """A LoRA/DoRA adapter, module by module, in PEFT's layout (A: (r, in), B: (out, r)); a MoE block's
    expert parameter (`...experts.down_proj`) per expert: a (experts, r, in), b (experts, out, r)."""

    kind: str  # "lora" | "dora"
    scale: float
    dropout: float
    a: dict[str, np.ndarray] = field(default_factory=dict)
    b: dict[str, np.ndarray] = field(default_factory=dict)
    m: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.a)

    def rank(self, module: str) -> int:
        return int(self.a[module].shape[-2])


@dataclass
class PromptAdapter:
    embeddings: np.ndarray  # (n_virtual, hidden)


def adapter_kind(config: dict[str, Any]) -> str:
    peft_type = config.get("peft_type", "")
    if peft_type == "LORA":
        return "dora" if config.get("use_dora") else "lora"
    return {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}.get(peft_type, str(peft_type).lower() or "unknown")


def lora_scale(config: dict[str, Any]) -> float:
    r, alpha = config["r"], config.get("lora_alpha", 8)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / PEFT_CONFIG
    if not path.exists():
        raise AdapterMismatchError(f"{folder}: no {PEFT_CONFIG}; this is not an adapter folder.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterMismatchError(f"{path}: not valid JSON ({e}).") from None


def read_adapter(folder: Path) -> tuple[dict[str, Any], LoraAdapter | PromptAdapter]:
    """Read a common (PEFT) adapter folder into its parts, refusing what ftkit's layers cannot hold."""
    folder = Path(folder)
    config = read_config(folder)
    weights = folder / PEFT_WEIGHTS
    if not weights.exists():
        hint = " (adapter_model.bin: load it once with PEFT and save with safe_serialization=True)" if (folder / "adapter_model.bin").exists() else ""
        raise AdapterMismatchError(f"{folder}: no {PEFT_WEIGHTS}{hint}.")
    tensors = read_safetensors(weights)
    kind = adapter_kind(config)
    if kind == "prompt":
        if "prompt_embeddings" not in tensors:
            raise AdapterMismatchError(f"{weights}: a prompt-tuning adapter without a prompt_embeddings tensor.")
        return config, PromptAdapter(tensors["prompt_embeddings"].astype(np.float32))
    if kind not in ("lora", "dora"):
        raise AdapterMismatchError(f"{folder}: a {config.get('peft_type')} adapter; ftkit reads LoRA, DoRA and prompt-tuning adapters.")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterMismatchError(f"{folder}: {key} (per-module rank or alpha) is not supported; retrain with one rank.")
    if config.get("modules_to_save"):
        raise AdapterMismatchError(f"{folder}: modules_to_save {config['modules_to_save']} (fully trained modules) are not supported in adapters.")
    where = str(weights)
    return config, parse_lora(tensors, kind, lora_scale(config), float(config.get("lora_dropout", 0.0)), where,
                              expert_counts_from_config(tensors, config, where))


def _peft_parts(tensors: dict[str, np.ndarray], where: str) -> dict[tuple[str, str], np.ndarray]:
    """(PEFT module name, part) -> tensor, refusing names that are not a LoRA's."""
    out = {}
    for key, value in tensors.items():
        match = _LORA_PART.match(key)
        if not match or not key.startswith(PEFT_PREFIX):
            raise AdapterMismatchError(
                f"{where}: unexpected tensor {key!r} (e.g. a LoRA on embeddings); ftkit adapts linear layers and MoE experts only."
            )
        out[match["module"][len(PEFT_PREFIX):], match["part"]] = np.asarray(value, dtype=np.float32)
    return out


def _is_peft_expert(module: str) -> bool:
    return module.endswith(experts.BASE_LAYER) or module.rsplit(".", 1)[-1] == "experts"


def expert_counts_from_config(tensors: dict[str, np.ndarray], config: dict[str, Any], where: str) -> dict[str, int]:
    """{expert parameter: number of experts} for an adapter folder's expert tensors: which parameters
    from its target_parameters, how many experts from lora_A's rows over r."""
    modules = {m for m, _ in _peft_parts(tensors, where) if _is_peft_expert(m)}
    targeted = [p for m in {experts.strip_base_layer(m)[0] for m in modules}
                for p in experts.in_config(config.get("target_parameters") or [], m)]
    names = experts.resolve(modules, targeted, where)
    rank = int(config.get("r", 0)) or 1
    return {param: tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"].shape[0] // rank for m, param in names.items()}


def parse_lora(tensors: dict[str, np.ndarray], kind: str, scale: float, dropout: float, where: str,
               expert_counts: dict[str, int] | None = None) -> LoraAdapter:
    """PEFT-named tensors -> a LoraAdapter, module by module; `expert_counts` ({expert parameter:
    number of experts}) says which parameter each expert tensor adapts."""
    lora = LoraAdapter(kind=kind, scale=scale, dropout=dropout)
    parts = _peft_parts(tensors, where)
    names = experts.resolve({m for m, _ in parts if _is_peft_expert(m)}, expert_counts or {}, where)
    for (module, part), value in parts.items():
        target = {"lora_A.weight": lora.a, "lora_B.weight": lora.b}.get(part, lora.m)
        target[names.get(module, module)] = value
    unpaired = sorted(set(lora.a) ^ set(lora.b))
    if unpaired:
        raise AdapterMismatchError(f"{where}: modules with only one of lora_A/lora_B: {', '.join(unpaired[:4])}.")
    if kind == "dora" and set(lora.m) != set(lora.a):
        raise AdapterMismatchError(f"{where}: a DoRA adapter must hold lora_magnitude_vector for every adapted module.")
    for param in names.values():
        lora.a[param], lora.b[param] = experts.from_peft(lora.a[param], lora.b[param], expert_counts[param], f"{where}: {param}")
    return lora


def lora_tensors(lora: LoraAdapter) -> dict[str, np.ndarray]:
    out = {}
    expert_params = [m for m in lora.modules if is_expert(m)]
    for module in lora.modules:
        a, b, name = lora.a[module], lora.b[module], module
        if module in expert_params:
            (a, b), name = experts.to_peft(a, b), experts.peft_module(module, expert_params)
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        if module in lora.m:
            out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = lora.m[module]
    return out


def mlx_expert_counts(native: dict[str, Any]) -> dict[str, int]:
    """{expert parameter: number of experts} of an MLX model's expert LoRA parameters, by their mlx-lm
    names (what `parse_lora` needs to read that model's tensors back)."""
    modules = {n.rsplit(".", 1)[0]: v for n, v in native.items() if n.endswith(".lora_a") and len(v.shape) == 3}
    return {experts.hf_name(m): int(v.shape[0]) for m, v in modules.items() if experts.is_native_expert(m)}


def target_spec(modules: list[str], all_layers: int | None = None) -> tuple[list[str], list[int] | None]:
    """PEFT's (target_modules, layers_to_transform) for exactly these module paths.

    Leaf names and layer indices when the set is their full product (what other tools expect to
    read; no layer list when that is every one of the model's `all_layers` blocks); the full paths
    otherwise, which PEFT also matches exactly.
    """
    if not modules:
        return [], None
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    layers = sorted({block_index(m) for m in modules} - {None})
    by_leaf: dict[str, set[int | None]] = {}
    for m in modules:
        by_leaf.setdefault(m.rsplit(".", 1)[-1], set()).add(block_index(m))
    rectangular = all(v == set(layers) for v in by_leaf.values()) and None not in set().union(*by_leaf.values())
    if rectangular and len(modules) == len(leaves) * len(layers):
        return leaves, (None if layers == list(range(all_layers or -1)) else layers)
    return sorted(modules), None


def lora_config(kind: str, rank: int, alpha: float, dropout: float, modules: list[str], base_model: str | None,
                all_layers: int | None = None) -> dict[str, Any]:
    """The adapter_config.json PEFT writes for a LoRA/DoRA of this shape."""
    targets = peft_targets(modules, all_layers)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, **targets,
        "use_dora": kind == "dora", "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def peft_targets(modules: list[str], all_layers: int | None = None) -> dict[str, Any]:
    """PEFT's target_modules, layers_to_transform and target_parameters for exactly these modules and
    expert parameters (the same on both backends, and in the config each writes)."""
    linear = [m for m in modules if not is_expert(m)]
    target_modules, layers = target_spec(linear, all_layers)
    return {"target_modules": target_modules, "layers_to_transform": layers,
            "target_parameters": experts.parameter_spec([m for m in modules if is_expert(m)], all_layers)}


def prompt_config(n_virtual: int, token_dim: int, num_layers: int, num_heads: int, base_model: str | None) -> dict[str, Any]:
    # RANDOM, not TEXT: with TEXT, PEFT reloads the tokenizer by name just to build a layer whose
    # values the saved tensor then overwrites. ftkit.json records how the prompt was initialised.
    return {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "num_virtual_tokens": n_virtual, "token_dim": token_dim, "num_transformer_submodules": 1,
        "num_attention_heads": num_heads, "num_layers": num_layers, "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "inference_mode": True,
        "modules_to_save": None, "revision": None,
    }


def write_adapter(folder: Path, config: dict[str, Any], adapter: LoraAdapter | PromptAdapter) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"prompt_embeddings": adapter.embeddings} if isinstance(adapter, PromptAdapter) else lora_tensors(adapter)
    write_safetensors(folder / PEFT_WEIGHTS, tensors)
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def to_mlx(lora: LoraAdapter, mlx_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """mlx-lm parameter names and shapes for a LoRA/DoRA adapter; `mlx_names` (the model's own LoRA
    parameter names) spell the experts' paths as that model does (Mixtral's `block_sparse_moe`)."""
    out = {}
    natives = experts.native_names([m for m in lora.modules if is_expert(m)], [n.rsplit(".", 1)[0] for n in mlx_names or []])
    for module in lora.modules:
        if module in natives:  # per expert already (experts, r, in) / (experts, out, r), as mlx-lm keeps them
            out[f"{natives[module]}.lora_a"], out[f"{natives[module]}.lora_b"] = lora.a[module], lora.b[module]
            continue
        out[f"{module}.lora_a"] = np.ascontiguousarray(lora.a[module].T)
        out[f"{module}.lora_b"] = np.ascontiguousarray(lora.b[module].T)
        if module in lora.m:
            out[f"{module}.m"] = lora.m[module]
    return out


def from_mlx(tensors: dict[str, np.ndarray], kind: str, scale: float, dropout: float) -> LoraAdapter:
    lora = LoraAdapter(kind=kind, scale=scale, dropout=dropout)
    for name, value in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if leaf not in ("lora_a", "lora_b", "m"):
            raise AdapterMismatchError(f"unexpected MLX adapter parameter {name!r} (expected .lora_a, .lora_b or .m).")
        value = np.asarray(value, dtype=np.float32)
        if leaf != "m" and value.ndim == 3 and experts.is_native_expert(module):
            (lora.a if leaf == "lora_a" else lora.b)[experts.hf_name(module)] = value
            continue
        if leaf != "m" and value.ndim != 2:
            raise AdapterMismatchError(
                f"{name}: shape {value.shape}; ftkit adapts MoE experts with one LoRA on gate and up together "
                "(switch_mlp.gate_up_proj, as PEFT's gate_up_proj) and on down_proj, not mlx-lm's separate gate_proj/up_proj LoRAs."
            )
        if leaf == "lora_a":
            lora.a[module] = np.ascontiguousarray(value.T)
        elif leaf == "lora_b":
            lora.b[module] = np.ascontiguousarray(value.T)
        else:
            lora.m[module] = value
    return lora


def check_targets(adapter: Path, adapter_modules: list[str], recipe_modules: list[str]) -> None:
    """Continuing training from an adapter: the recipe must adapt the same modules."""
    have, want = set(adapter_modules), set(recipe_modules)
    if have == want:
        return
    extra, missing = sorted(want - have), sorted(have - want)
    parts = []
    if extra:
        parts.append(f"the recipe adapts {len(extra)} module(s) the adapter lacks (e.g. {', '.join(extra[:3])})")
    if missing:
        parts.append(f"the adapter holds {len(missing)} module(s) the recipe does not target (e.g. {', '.join(missing[:3])})")
    raise AdapterMismatchError(
        f"{adapter}: target set differs: {'; '.join(parts)}. Set method.targets / method.layers to match the adapter."
    )


def check_fits(adapter: Path, weights: LoraAdapter | PromptAdapter, linear_shapes: dict[str, tuple[int, int]], hidden: int) -> None:
    """Refuse an adapter made for another architecture, naming the first module that does not fit.

    `linear_shapes` maps the model's linear layers to (out, in), and its MoE expert parameters to
    (experts, out, in). This runs before any tensor is loaded, so a mismatch reads as one sentence
    instead of a library's size-mismatch trace.
    """
    if isinstance(weights, PromptAdapter):
        if weights.embeddings.shape[1] != hidden:
            raise AdapterMismatchError(
                f"{adapter}: soft prompt of width {weights.embeddings.shape[1]}, but this model's hidden size is {hidden}: "
                "it was trained on a different base model."
            )
        return
    absent = [m for m in weights.modules if m not in linear_shapes]
    if absent:
        raise AdapterMismatchError(
            f"{adapter}: adapts {len(absent)} module(s) this model does not have (e.g. {', '.join(absent[:3])}): "
            "it was trained on a different base model."
        )
    for m in weights.modules:
        if is_expert(m):
            _check_expert_fits(adapter, m, weights, linear_shapes[m])
            continue
        out_dim, in_dim = linear_shapes[m]
        a, b = weights.a[m].shape, weights.b[m].shape
        if len(a) != 2 or a[1] != in_dim or b[0] != out_dim or a[0] != b[1]:
            raise AdapterMismatchError(
                f"{adapter}: {m} has lora_A {tuple(a)} and lora_B {tuple(b)}, but this model's {m} maps {in_dim} -> {out_dim}: "
                "it was trained on a different base model."
            )


def _check_expert_fits(adapter: Path, m: str, weights: LoraAdapter, shape: tuple[int, ...]) -> None:
    n, out_dim, in_dim = shape
    a, b = weights.a[m].shape, weights.b[m].shape
    r = a[-2]
    if a != (n, r, in_dim) or b != (n, out_dim, r):
        raise AdapterMismatchError(
            f"{adapter}: {m} has per-expert lora_A {tuple(a)} and lora_B {tuple(b)}, but this model's {m} is {n} experts "
            f"mapping {in_dim} -> {out_dim}: it was trained on a different base model."
        )


def open_for(adapter: Path, linear_shapes: dict[str, tuple[int, int]], hidden: int, *, method=None,
             num_layers: int | None = None) -> tuple[dict[str, Any], LoraAdapter | PromptAdapter | None]:
    """Read an adapter for a loaded model and refuse it, naming why, if it does not fit.

    With `method` (training continues from the adapter) the recipe must also target the same modules.
    A prefix adapter comes back as (config, None): its width depends on layers x heads, not on one
    module, so the library that loads it checks it.
    """
    config = read_config(adapter)
    if adapter_kind(config) == "prefix":
        return config, None
    config, weights = read_adapter(adapter)
    check_fits(adapter, weights, linear_shapes, hidden)
    if method is not None and isinstance(weights, LoraAdapter):
        check_targets(adapter, weights.modules, select(list(linear_shapes), method, num_layers))
    return config, weights
