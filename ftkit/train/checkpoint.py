"""Atomic writes and the checkpoint layout of a run folder.

run_dir/
  checkpoints/step-000040/   adapter/ (common format), state/ (backend: optimizer, RNG), trainer_state.json
  adapter/                   the final adapter (or model folder, for full fine-tuning)
  metrics.jsonl, loss.png, recipe.toml

A checkpoint folder is built under a temporary name and renamed into place; `trainer_state.json` is
written last inside it. A folder without that file, or still under its temporary name, is never picked.
Pruning renames a folder out of the checkpoint names before deleting it, so a kill mid-prune leaves a
leftover that `clean_partial` removes, never a half-deleted folder that looks like a checkpoint.

A full disk or a read-only folder is an FtkitError naming the folder and the space a checkpoint needs
(`writing`); the checkpoint before stays complete.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftkit.common.errors import FtkitError

STEP_DIR = re.compile(r"^step-(\d{6,})$")


STATE_FILE = "trainer_state.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove leftovers of interrupted writes (temporary folders); return what was removed."""
    removed = []
    for root in (run_dir, run_dir / "checkpoints"):
        if root.is_dir():
            for p in root.iterdir():
                if p.name.startswith(".") and any(mark in p.name for mark in (".tmp-", ".old-", ".pruned-")):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints: each renamed out of the checkpoint names first."""
    for old in complete_checkpoints(run_dir)[:-keep]:
        gone = old.with_name(f".{old.name}.pruned-{os.getpid()}")
        os.replace(old, gone)
        shutil.rmtree(gone, ignore_errors=True)


# ---------------------------------------------------------------- space and permissions

# Bytes a checkpoint holds per trainable parameter: the values in float32, and the optimizer's state.
_OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2,
                    "paged_lion_8bit": 1, "sgd": 4, "adafactor": 4}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_bytes(run_dir: Path, trainable_params: int, optimizer: str) -> int:
    """What the next checkpoint needs on disk: the newest complete one's size, else an estimate from the
    trainable parameter count (float32 values and the optimizer's state)."""
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        try:
            return folder_bytes(latest)
        except OSError:
            pass
    return int(trainable_params * (4 + _OPTIMIZER_BYTES.get(optimizer, 8))) + (1 << 16)  # + configs, model card, state files


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def check_writable(run_dir: Path, resume: str | None) -> None:
    """An FtkitError before anything is loaded when the run folder cannot be written."""
    probe = run_dir / f".write-probe.tmp-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ftkit")
        probe.unlink()
    except OSError as e:
        again = (" To go on with this run, copy the run folder to a writable place and pass --resume auto with "
                 "output.dir set there (--set output.dir=...)." if resume else " Set output.dir (--set output.dir=...) to a writable folder.")
        raise FtkitError(f"{run_dir} is not writable ({e.strerror or e}): a run writes its checkpoints, metrics log "
                         f"and adapter there.{again}") from e


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def space_warning(run_dir: Path, need: int, keep: int) -> str | None:
    """A warning when the run folder's file system holds fewer than two checkpoints of `need` bytes."""
    free = free_bytes(run_dir)
    if free is None or free >= 2 * need:
        return None
    return (f"warning: {run_dir} has {human(free)} free, and a checkpoint needs about {human(need)} (ftkit keeps "
            f"train.keep_checkpoints = {keep} and writes the next beside them): free some space, or set output.dir elsewhere.")


_FULL = (errno.ENOSPC, errno.EDQUOT) if hasattr(errno, "EDQUOT") else (errno.ENOSPC,)
_DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)


def _errnos(err: BaseException) -> Iterator[int]:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            yield seen.errno
        seen = seen.__cause__ or seen.__context__


def write_problem(folder: Path, err: BaseException, need: int) -> str | None:
    """Why writing into `folder` failed when it is the disk or the permissions; None for anything else.

    torch.save, safetensors and MLX report a full disk in their own words (a RuntimeError, "os error 28"),
    so the file system is asked as well."""
    codes, text = set(_errnos(err)), str(err)
    free = free_bytes(folder)
    a_write = isinstance(err, OSError) or any(w in text.lower() for w in ("write", "writing", "serializ", "ioerror", "i/o"))
    full = bool(codes & set(_FULL)) or "No space left" in text or "os error 28" in text or "StorageFull" in text
    if full or (a_write and free is not None and free < need):
        have = f"{human(free)} free" if free is not None else "no free space"
        return (f"{folder}: the disk is full ({have}); a checkpoint needs about {human(need)}. Nothing was left "
                "half-written, and the newest complete checkpoint is unchanged (--resume auto picks it): free some "
                "space, lower train.keep_checkpoints, or move the run folder to a larger disk.")
    writable = os.access(folder, os.W_OK) if folder.exists() else True
    if codes & set(_DENIED) or "Read-only file system" in text or "os error 30" in text or not writable:
        return (f"{folder} is not writable ({err}): the checkpoint was not written, and the newest complete one is "
                "unchanged (--resume auto picks it). Make the folder writable, or copy the run folder to a writable "
                "place and resume there (--set output.dir=... --resume auto).")
    return None


@contextmanager
def writing(folder: Path, need: Callable[[], int]) -> Iterator[None]:
    """Turn a failed write into `folder` that is the disk's or the permissions' fault into an FtkitError."""
    try:
        yield
    except FtkitError:
        raise
    except Exception as e:
        problem = write_problem(folder, e, need())
        if problem is None:
            raise
        raise FtkitError(problem) from e
