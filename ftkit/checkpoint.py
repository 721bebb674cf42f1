"""Atomic writes and the checkpoint layout of a run folder.

run_dir/
  checkpoints/step-000040/   adapter/ (common format), state/ (backend: optimizer, RNG), trainer_state.json
  adapter/                   the final adapter (or model folder, for full fine-tuning)
  metrics.jsonl, loss.png, recipe.toml

A checkpoint folder is built under a temporary name and renamed into place; `trainer_state.json` is
written last inside it. A folder without that file, or still under its temporary name, is never picked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftkit.distributed import World, shared_dir_check
from ftkit.errors import FtkitError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(dest: Path, world: World | None = None, sync: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `dest` in one rename, on failure it is removed.

    In a multi-process run every process writes its part into the same temporary folder: rank 0
    makes it and renames it, `sync` (a barrier) keeps the others between those two moments.
    """
    shared = world is not None and world.size > 1
    tmp = dest.with_name(f".{dest.name}.tmp-{'shared' if shared else os.getpid()}")
    if not shared or world.is_main:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if shared:
        sync()
        problem = shared_dir_check(tmp)
        if problem:
            raise FtkitError(problem)
    try:
        yield tmp
    except BaseException:
        if not shared or world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if shared:
        sync()
        if not world.is_main:
            sync()
            return
    if dest.exists():
        # Two renames: the old folder stays whole until the new one is in place.
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    if shared:
        sync()


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
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def prune(run_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
