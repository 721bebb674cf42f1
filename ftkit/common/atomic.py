"""Atomic writes: a file or a folder appears whole under its name or not at all (one rule, used by every writer)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ftkit.common.distributed import World, shared_dir_check
from ftkit.common.errors import FtkitError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that opens the file itself (a GGUF writer); on
    success it replaces `path` in one rename, on failure it is removed. Beside: a rename across file
    systems would not be atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename, so a crash leaves the old file or the new one
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Yield a file open for writing (`mode` "w", UTF-8, or "wb"), replacing `path` whole on success."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(dest: Path, world: World | None = None, sync: Callable[[], None] | None = None,
               keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `dest` in one rename, on failure it is removed.

    `keep_existing`: a `dest` that is already there (another process wrote the same content first,
    as with a cache entry) is kept and the new folder dropped.

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
    if dest.exists() and keep_existing:
        shutil.rmtree(tmp, ignore_errors=True)
    elif dest.exists():
        # Two renames: the old folder stays whole until the new one is in place.
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(tmp, dest)
        except OSError:  # a folder put in place since the check above
            if not (keep_existing and dest.exists()):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    if shared:
        sync()
