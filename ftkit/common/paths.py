"""Where ftkit keeps what it caches ($FTKIT_CACHE, else ~/.cache/ftkit)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("FTKIT_CACHE") or Path.home() / ".cache" / "ftkit").expanduser()
