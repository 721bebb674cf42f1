"""`ftkit export --format mlx`: an adapter as mlx-lm's own adapter folder.

mlx-lm (`mlx_lm.generate --adapter-path`, `mlx_lm.server`, `mlx_lm.fuse`, and the apps built on
mlx-lm such as LM Studio) loads an adapter with `mlx_lm.tuner.utils.load_adapters`, which reads

- `adapter_config.json`: `fine_tune_type` ("lora" | "dora"), `num_layers` and `lora_parameters`
  {rank, scale, dropout, keys}; `linear_to_lora_layers` wraps, in each of the last `num_layers`
  blocks of `model.layers`, the modules whose path relative to the block is in `keys`
  ("self_attn.q_proj"), and then every module of the whole model whose full path is in `keys`;
- `adapters.safetensors`: the parameters by their full mlx-lm names, `<module>.lora_a` (in, r),
  `<module>.lora_b` (r, out), `<module>.m` for DoRA (ftkit.adapters.layout.to_mlx writes them),
  checked name by name and shape by shape against the wrapped model.

One rank and one scale (PEFT's lora_alpha / r, or / sqrt(r) with rsLoRA) for every module. A set of
the same modules in each of the last N blocks is written as mlx-lm writes it (block-relative keys,
num_layers = N); any other set (some layers only, other modules per layer) by full module paths,
which the whole-model pass wraps one by one: the same function either way, no module more or less.

Routed MoE experts: mlx-lm keeps a block's experts in `switch_mlp` (Mixtral's `block_sparse_moe.
switch_mlp`) with separate `gate_proj` and `up_proj`; ftkit (as PEFT on transformers 5's
`gate_up_proj`) has one LoRA on gate and up together. A LoRA on a stack of two matrices is a LoRA on
each with the same A and B's two halves (gate first), so it becomes two of mlx-lm's LoRASwitchLinear,
exactly. mlx-lm has no DoRA on experts, and no soft prompts: those are refused, with why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ftkit.adapters import layout as adapter_layout
from ftkit.adapters.resolve import resolve
from ftkit.adapters.targets import block_index, is_expert
from ftkit.common.atomic import atomic_dir
from ftkit.common.errors import FtkitError
from ftkit.common.hub import looks_like_hub_id
from ftkit.common.tensors import write_safetensors
from ftkit.models.resolve import resolve_model
from ftkit.ops.fuse import base_model_of

MLX_LM_CONFIG = "adapter_config.json"

# mlx-lm model types whose MoE block is `block_sparse_moe` (the rest: `mlp`), as mlx_lm/models spell them.
_BLOCK_SPARSE_MOE = ("mixtral", "phimoe", "granitemoe", "granitemoehybrid", "minimax")


def _base_config(adapter: Path, model: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """The base model's config.json (only that file: a hub model is not downloaded for it), or None
    when the base is neither given nor found; `--model` that is not found is an error."""
    base = model or base_model_of(adapter)
    if not base:
        return None, None
    local = Path(base).expanduser()
    if local.is_dir() and (local / "config.json").exists():
        return json.loads((local / "config.json").read_text()), base
    if local.exists():  # a .gguf or llama2.c file, or a folder holding one: converted (cached) as training did
        return json.loads((resolve_model(base) / "config.json").read_text()), base
    if looks_like_hub_id(base):
        from huggingface_hub import hf_hub_download  # only when the base is a hub id

        try:
            return json.loads(Path(hf_hub_download(base, "config.json")).read_text()), base
        except Exception as e:  # offline and not cached, unknown repo, gated
            if model:
                raise FtkitError(f"--model {model}: could not read its config.json from the Hugging Face hub ({e}).") from None
            return None, base
    if model:
        raise FtkitError(f"--model {model}: no such model folder or file, and not a hub id.")
    return None, base


def _num_blocks(base: dict[str, Any] | None, config: dict[str, Any], blocks: set[int]) -> int | None:
    """How many blocks the model has: the base's config, else (PEFT's every-layer adapter, leaf names
    and no layers_to_transform) one past the last adapted block; None when unknown."""
    if base:
        n = base.get("num_hidden_layers") or (base.get("text_config") or {}).get("num_hidden_layers")
        if n:
            return int(n)
    targets = config.get("target_modules") or []
    if blocks and config.get("layers_to_transform") is None and isinstance(targets, list) and all("." not in t for t in targets):
        return max(blocks) + 1
    return None


def _refuse_kind(src: Path, folder: Path, kind: str) -> None:
    if kind == "prompt":
        raise FtkitError(f"{src}: a prompt-tuning (soft prompt) adapter; mlx-lm's adapters are LoRA and DoRA on linear layers "
                         "and it has no soft prompts. Use it with ftkit on either backend (ftkit generate/eval --adapter), or PEFT.")
    if kind == "prefix":
        raise FtkitError(f"{src}: a prefix-tuning adapter; mlx-lm's adapters are LoRA and DoRA on linear layers "
                         "and it has no prefix tuning. Use it with PEFT.")
    raise FtkitError(f"{folder}: a {kind} adapter; mlx-lm loads LoRA and DoRA adapters only.")


def _expert_natives(lora: adapter_layout.LoraAdapter, model_type: str | None, src: Path) -> list[str]:
    """mlx-lm's names for the expert parameters' LoRA (what to_mlx's `mlx_names` spells them by)."""
    params = [m for m in lora.modules if is_expert(m)]
    if not params:
        return []
    if lora.kind == "dora":
        raise FtkitError(f"{src}: a DoRA adapter on MoE experts ({params[0]} ...); mlx-lm has no DoRA on experts "
                         "(SwitchLinear \"doesn't support DoRA yet\"). Retrain with method.kind = \"lora\", or fuse it (ftkit fuse).")
    if model_type is None:
        raise FtkitError(f"{src}: adapts MoE experts, whose mlx-lm names depend on the model family, and its base model's "
                         "config.json is not here; pass --model (the base model folder or hub id).")
    block = "block_sparse_moe" if model_type in _BLOCK_SPARSE_MOE else "mlp"
    return [m.replace(".mlp.experts.", f".{block}.switch_mlp.") + ".lora_a" for m in params]


def _split_gate_up(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`switch_mlp.gate_up_proj` (one LoRA on gate and up stacked, gate first) -> mlx-lm's
    `switch_mlp.gate_proj` and `switch_mlp.up_proj`: the same A, each its half of B."""
    out = {}
    for name, value in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if not module.endswith(".switch_mlp.gate_up_proj"):
            out[name] = value
            continue
        head = module[: -len("gate_up_proj")]
        if leaf == "lora_a":
            out[f"{head}gate_proj.lora_a"] = out[f"{head}up_proj.lora_a"] = value
        else:  # lora_b: (experts, 2 x intermediate, r)
            half = value.shape[1] // 2
            out[f"{head}gate_proj.lora_b"] = np.ascontiguousarray(value[:, :half])
            out[f"{head}up_proj.lora_b"] = np.ascontiguousarray(value[:, half:])
    return out


def _relative(module: str) -> str | None:
    """A module path relative to its block ("self_attn.q_proj"), or None outside the blocks."""
    i = block_index(module)
    return None if i is None else module.split(f"layers.{i}.", 1)[1]


def layer_spec(modules: list[str], n_blocks: int | None) -> tuple[int, list[str]]:
    """mlx-lm's (num_layers, keys) that wrap exactly these modules (mlx-lm's names)."""
    in_blocks = [m for m in modules if block_index(m) is not None]
    outside = sorted(m for m in modules if block_index(m) is None)  # matched by full path in mlx-lm's second pass
    by_block: dict[int, set[str]] = {}
    for m in in_blocks:
        by_block.setdefault(block_index(m), set()).add(_relative(m))
    if not by_block:
        return 0, outside
    keys = set().union(*by_block.values())
    first = min(by_block)
    if n_blocks is not None and set(by_block) == set(range(first, n_blocks)) and all(v == keys for v in by_block.values()):
        return n_blocks - first, sorted(keys) + outside
    # Some layers only, or other modules per layer: every module by its full path. num_layers then
    # wraps nothing (full paths never match block-relative ones) and says which blocks hold the adapter.
    return (n_blocks if n_blocks is not None else max(by_block) + 1) - first, sorted(modules)


def _default_out(src: Path) -> Path:
    """Beside the adapter, named after the run: runs/NAME/adapter -> runs/NAME/NAME-mlx."""
    src = Path(src).resolve()
    name = src.parent.name if src.name == "adapter" else src.name
    return src.parent / f"{name}-mlx"


def export_mlx(src: Path, out: Path | None = None, *, model: str | None = None, force: bool = False) -> dict[str, Any]:
    """The adapter as an mlx-lm adapter folder (adapters.safetensors + adapter_config.json); returns what was written."""
    src = Path(src)
    if src.is_dir() and not (src / adapter_layout.PEFT_CONFIG).exists() and (src / "config.json").exists():
        raise FtkitError(f"{src}: a model folder (a full fine-tune or a fused model), not an adapter; mlx-lm loads it "
                         f"as a model: mlx_lm.generate --model {src}.")
    folder = resolve(src)
    config = adapter_layout.read_config(folder)
    kind = adapter_layout.adapter_kind(config)
    if kind not in ("lora", "dora"):
        _refuse_kind(src, folder, kind)
    config, lora = adapter_layout.read_adapter(folder)
    ranks = sorted({lora.rank(m) for m in lora.modules})
    if not ranks:
        raise FtkitError(f"{src}: the adapter holds no LoRA tensors.")
    if len(ranks) != 1:
        raise FtkitError(f"{src}: modules of different ranks {ranks}; mlx-lm's lora_parameters hold one rank for every module.")
    base, base_name = _base_config(folder, model)
    tensors = _split_gate_up(adapter_layout.to_mlx(lora, _expert_natives(lora, (base or {}).get("model_type"), src)))
    modules = sorted({name.rsplit(".", 1)[0] for name in tensors})
    n_blocks = _num_blocks(base, config, {block_index(m) for m in modules} - {None})
    num_layers, keys = layer_spec(modules, n_blocks)

    out = Path(out) if out else _default_out(src)
    if out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents:
        raise FtkitError(f"--out {out}: that would replace the adapter being exported; choose another folder.")
    if out.exists() and not force:
        raise FtkitError(f"{out} already exists; pass --force to replace it, or choose another --out.")
    mlx_config = {
        "fine_tune_type": kind,
        "num_layers": num_layers,
        "lora_parameters": {"rank": ranks[0], "scale": float(lora.scale), "dropout": float(lora.dropout), "keys": keys},
        "model": base_name,
    }
    with atomic_dir(out) as tmp:
        write_safetensors(tmp / adapter_layout.MLX_LM_WEIGHTS, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()},
                          metadata={"format": "mlx"})
        (tmp / MLX_LM_CONFIG).write_text(json.dumps(mlx_config, indent=2) + "\n")
    return {"mlx": str(out), "bytes": sum(p.stat().st_size for p in out.iterdir()), "fine_tune_type": kind,
            "num_layers": num_layers, "keys": keys, "full_paths": any(block_index(k) is not None for k in keys),
            "rank": ranks[0], "scale": float(lora.scale), "modules": len(modules), "tensors": len(tensors),
            "base_model": base_name, "adapter": str(folder)}
