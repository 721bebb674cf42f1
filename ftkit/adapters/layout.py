"""The common adapter folder's tensors and config, and the conversions to and from MLX's layout.

The common folder is PEFT's: `adapter_config.json` + `adapter_model.safetensors`, keys such as
`base_model.model.<module>.lora_A.weight` (r, in), `...lora_B.weight` (out, r),
`...lora_magnitude_vector` (out,) for DoRA, and `prompt_embeddings` (n, hidden) for soft prompts.
MLX (mlx-lm's layers) keeps `<module>.lora_a` (in, r), `<module>.lora_b` (r, out), `<module>.m`,
and a `scale` where PEFT keeps `lora_alpha / r`. Module paths are the Hugging Face names, which
mlx-lm's Llama/Mistral/Qwen/Phi/Gemma definitions share.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftkit.adapters.targets import block_index, select
from ftkit.common.errors import AdapterMismatchError
from ftkit.common.tensors import read_safetensors, write_safetensors

PEFT_PREFIX = "base_model.model."


PEFT_WEIGHTS = "adapter_model.safetensors"


PEFT_CONFIG = "adapter_config.json"


MLX_LM_WEIGHTS = "adapters.safetensors"


_LORA_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")


@dataclass
class LoraAdapter:
    """A LoRA/DoRA adapter, module by module, in PEFT's layout (A: (r, in), B: (out, r))."""

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
        return int(self.a[module].shape[0])


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
    return config, parse_lora(tensors, kind, lora_scale(config), float(config.get("lora_dropout", 0.0)), str(weights))


def parse_lora(tensors: dict[str, np.ndarray], kind: str, scale: float, dropout: float, where: str) -> LoraAdapter:
    """PEFT-named tensors -> a LoraAdapter, module by module."""
    lora = LoraAdapter(kind=kind, scale=scale, dropout=dropout)
    for key, value in tensors.items():
        match = _LORA_PART.match(key)
        if not match or not key.startswith(PEFT_PREFIX):
            raise AdapterMismatchError(
                f"{where}: unexpected tensor {key!r} (e.g. a LoRA on embeddings); ftkit adapts linear layers only."
            )
        module, part = match["module"][len(PEFT_PREFIX):], match["part"]
        target = {"lora_A.weight": lora.a, "lora_B.weight": lora.b}.get(part, lora.m)
        target[module] = np.asarray(value, dtype=np.float32)
    unpaired = sorted(set(lora.a) ^ set(lora.b))
    if unpaired:
        raise AdapterMismatchError(f"{where}: modules with only one of lora_A/lora_B: {', '.join(unpaired[:4])}.")
    if kind == "dora" and set(lora.m) != set(lora.a):
        raise AdapterMismatchError(f"{where}: a DoRA adapter must hold lora_magnitude_vector for every adapted module.")
    return lora


def lora_tensors(lora: LoraAdapter) -> dict[str, np.ndarray]:
    out = {}
    for module in lora.modules:
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lora.a[module]
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lora.b[module]
        if module in lora.m:
            out[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"] = lora.m[module]
    return out


def target_spec(modules: list[str], all_layers: int | None = None) -> tuple[list[str], list[int] | None]:
    """PEFT's (target_modules, layers_to_transform) for exactly these module paths.

    Leaf names and layer indices when the set is their full product (what other tools expect to
    read; no layer list when that is every one of the model's `all_layers` blocks); the full paths
    otherwise, which PEFT also matches exactly.
    """
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
    targets, layers = target_spec(modules, all_layers)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
        "layers_to_transform": layers, "use_dora": kind == "dora", "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


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


def to_mlx(lora: LoraAdapter) -> dict[str, np.ndarray]:
    """mlx-lm parameter names and shapes for a LoRA/DoRA adapter."""
    out = {}
    for module in lora.modules:
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
        if leaf != "m" and value.ndim != 2:
            raise AdapterMismatchError(f"{name}: shape {value.shape}; only linear-layer LoRA (2-D) is supported, not mixture-of-experts layers.")
        value = np.asarray(value, dtype=np.float32)
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

    `linear_shapes` maps the model's linear layers to (out, in). This runs before any tensor is
    loaded, so a mismatch reads as one sentence instead of a library's size-mismatch trace.
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
        out_dim, in_dim = linear_shapes[m]
        a, b = weights.a[m].shape, weights.b[m].shape
        if a[1] != in_dim or b[0] != out_dim or a[0] != b[1]:
            raise AdapterMismatchError(
                f"{adapter}: {m} has lora_A {tuple(a)} and lora_B {tuple(b)}, but this model's {m} maps {in_dim} -> {out_dim}: "
                "it was trained on a different base model."
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
