"""Where an adapter is read from: a folder, a hub id, or an mlx_lm adapter folder imported into the common format."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ftkit.adapters import experts
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
from ftkit.common.suggest import missing_path
from ftkit.common.tensors import read_header, read_safetensors


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
    rank = _number(params["rank"], folder / PEFT_CONFIG, "lora_parameters.rank", whole=True)
    scale = _number(params["scale"], folder / PEFT_CONFIG, "lora_parameters.scale")
    dropout = _number(params.get("dropout", 0.0), folder / PEFT_CONFIG, "lora_parameters.dropout")
    try:
        lora = from_mlx(read_safetensors(folder / MLX_LM_WEIGHTS), ftype, scale, dropout)
    except AdapterMismatchError as e:
        raise AdapterMismatchError(f"{folder / MLX_LM_WEIGHTS}: {e}") from None
    ranks = {lora.rank(m) for m in lora.modules}
    if ranks != {rank}:
        raise AdapterMismatchError(f"{folder}: tensors have rank {sorted(ranks)} but lora_parameters.rank is {params['rank']} "
                                   f"({folder / PEFT_CONFIG}); the config does not belong to these weights.")
    cfg = lora_config(ftype, rank, lora.scale * rank, lora.dropout, lora.modules, config.get("model"))
    write_adapter(dest, cfg, lora)


def _number(value: Any, where: Path, key: str, whole: bool = False) -> Any:
    """A config's number, or an error naming the file, the key and the value it holds instead."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not whole or float(value).is_integer())
    if not ok or value < 0 or (whole and value < 1):
        raise AdapterMismatchError(f"{where}: {key} = {value!r}; it must be a {'whole number >= 1' if whole else 'number >= 0'}.")
    return int(value) if whole else float(value)


def check_rank(folder: Path) -> None:
    """A LoRA/DoRA folder's adapter_config.json must describe its tensors: r a whole number, lora_alpha a
    number, and every (non-expert) lora_A holding r rows. Both backends load through here, so neither
    trusts a config whose r was edited (MLX would scale by alpha / r with the wrong r; PEFT would answer
    with a state-dict dump). Reads the safetensors header only."""
    config = read_config(folder)
    if config.get("peft_type") != "LORA" or config.get("rank_pattern"):
        return  # per-module ranks: read_adapter refuses those, naming why
    where = Path(folder) / PEFT_CONFIG
    r = _number(config.get("r"), where, "r", whole=True)
    if "lora_alpha" in config:
        _number(config["lora_alpha"], where, "lora_alpha")
    weights = Path(folder) / PEFT_WEIGHTS
    if not weights.is_file():
        return  # read_adapter names what is missing
    header, _ = read_header(weights)
    ranks: dict[int, str] = {}
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not name.endswith("lora_A.weight") or not shape or len(shape) != 2 or _is_expert_tensor(name):
            continue
        ranks.setdefault(int(shape[0]), f"{name} is {tuple(shape)}")
    if ranks and set(ranks) != {r}:
        found = sorted(ranks)
        example = ranks[next(k for k in found if k != r)]
        raise AdapterMismatchError(
            f"{folder}: {PEFT_CONFIG} says r = {r}, but the tensors in {PEFT_WEIGHTS} have rank "
            f"{' and '.join(map(str, found))} (e.g. {example}): the config does not belong to these weights. "
            f"Put the config saved with them beside them{f', or set r = {found[0]}' if len(found) == 1 else ''}."
        )


def _is_expert_tensor(name: str) -> bool:
    """A MoE expert parameter's lora_A stacks every expert's rows (experts x r), so its rows are not r."""
    module = name[: -len(".lora_A.weight")]
    return module.endswith(experts.BASE_LAYER) or module.rsplit(".", 1)[-1] == "experts"


def resolve(folder: Path) -> Path:
    """A folder in the common format for `folder`: itself, an mlx-lm adapter converted once (cached), or a hub
    id's repository downloaded (then converted if it holds an mlx-lm adapter). Its config is checked
    against its tensors (`check_rank`) before either backend loads it."""

    folder = Path(folder)
    if not folder.is_dir():

        if not looks_like_repo(str(folder)):
            raise AdapterMismatchError(f"{folder}: no such adapter folder (nor a hub id, user/name).{missing_path(folder)}")
        folder = snapshot(str(folder))  # a hub id: the repository's files, downloaded once
    if not is_mlx_lm_adapter(folder):
        if (folder / PEFT_CONFIG).is_file():
            check_rank(folder)
        return folder
    h = hashlib.sha256()
    for name in (MLX_LM_WEIGHTS, PEFT_CONFIG):
        h.update((folder / name).read_bytes())
    dest = cache_root() / "adapters" / f"mlx_lm-{h.hexdigest()[:16]}"
    if not (dest / PEFT_WEIGHTS).exists():
        with atomic_dir(dest) as tmp:
            import_mlx_lm(folder, tmp)
    return dest
