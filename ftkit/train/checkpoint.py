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
import re
import shutil
from pathlib import Path
from typing import Any

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
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def prune(run_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
