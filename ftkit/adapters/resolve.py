"""Where an adapter is read from: a folder, a hub id, or an mlx_lm adapter folder imported into the common format."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ftkit.adapters.layout import (
    MLX_LM_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    from_mlx,
    lora_config,
    read_config,
    write_adapter,
)
from ftkit.common.atomic import atomic_dir
from ftkit.common.errors import AdapterMismatchError
from ftkit.common.hub import looks_like_repo, snapshot
from ftkit.common.paths import cache_root
from ftkit.common.tensors import read_safetensors


def is_mlx_lm_adapter(folder: Path) -> bool:
    return (Path(folder) / MLX_LM_WEIGHTS).exists() and not (Path(folder) / PEFT_WEIGHTS).exists()


def import_mlx_lm(folder: Path, dest: Path) -> None:
    """Rewrite an `mlx_lm lora` adapter folder (adapters.safetensors + its adapter_config.json) as a PEFT one."""
    config = read_config(folder)
    ftype = config.get("fine_tune_type", "lora")
    if ftype not in ("lora", "dora"):
        raise AdapterMismatchError(
            f"{folder}: an mlx_lm '{ftype}' fine-tune, not an adapter; fuse it with `mlx_lm fuse` and use the result as model.path."
        )
    params = config.get("lora_parameters") or {}
    if "rank" not in params or "scale" not in params:
        raise AdapterMismatchError(f"{folder / PEFT_CONFIG}: lora_parameters needs rank and scale (an mlx_lm adapter config).")
    lora = from_mlx(read_safetensors(folder / MLX_LM_WEIGHTS), ftype, float(params["scale"]), float(params.get("dropout", 0.0)))
    ranks = {lora.rank(m) for m in lora.modules}
    if ranks != {int(params["rank"])}:
        raise AdapterMismatchError(f"{folder}: tensors have rank {sorted(ranks)} but lora_parameters.rank is {params['rank']}.")
    rank = int(params["rank"])
    cfg = lora_config(ftype, rank, lora.scale * rank, lora.dropout, lora.modules, config.get("model"))
    write_adapter(dest, cfg, lora)


def resolve(folder: Path) -> Path:
    """A folder in the common format for `folder`: itself, an mlx-lm adapter converted once (cached), or a hub
    id's repository downloaded (then converted if it holds an mlx-lm adapter)."""

    folder = Path(folder)
    if not folder.is_dir():

        if not looks_like_repo(str(folder)):
            raise AdapterMismatchError(f"{folder}: no such adapter folder (nor a hub id, user/name).")
        folder = snapshot(str(folder))  # a hub id: the repository's files, downloaded once
    if not is_mlx_lm_adapter(folder):
        return folder
    h = hashlib.sha256()
    for name in (MLX_LM_WEIGHTS, PEFT_CONFIG):
        h.update((folder / name).read_bytes())
    dest = cache_root() / "adapters" / f"mlx_lm-{h.hexdigest()[:16]}"
    if not (dest / PEFT_WEIGHTS).exists():
        with atomic_dir(dest) as tmp:
            import_mlx_lm(folder, tmp)
    return dest
