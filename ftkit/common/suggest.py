"""Did-you-mean, once for every message that names an unknown word (or a missing file)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path


def closest(word: str, options: Iterable[str], aliases: Mapping[str, str] | None = None) -> str | None:
    """The option `word` was most likely meant to be, or None: `aliases` first (another tool's name for
    an option, e.g. learning_rate -> lr), then difflib's ratio >= 0.6."""
    if aliases:
        known = aliases.get(str(word)) or aliases.get(str(word).lower())
        if known:
            return known
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, options: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """" Did you mean 'x'?" to append to a message, or "" when nothing is close."""
    close = closest(word, options, aliases)
    return f" Did you mean '{close}'?" if close else ""


def missing_path(path: str | Path) -> str:
    """" Did you mean 'train.jsonl'?" for a path that does not exist, over what its nearest existing
    folder holds (the first missing part of the path is the one compared), or ""."""
    p = Path(path).expanduser()
    parts = p.parts
    for i in range(len(parts) - 1, 0, -1):
        parent = Path(*parts[:i])
        try:
            if parent.is_dir():
                names = sorted(c.name for c in parent.iterdir() if not c.name.startswith("."))
                return did_you_mean(parts[i], names)
        except OSError:
            return ""
    return ""
