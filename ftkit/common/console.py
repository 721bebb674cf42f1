"""The training progress bar, a spinner for slow setup work, and the shared stderr console.

Everything here writes to stderr: in `--json` mode stdout must carry exactly one JSON object.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache

from rich.console import Console


@lru_cache(maxsize=1)
def _stderr_console() -> Console:
    return Console(stderr=True)


def console() -> Console:
    """The one stderr console every module prints through, so output never interleaves with stdout."""
    return _stderr_console()


def status(message: str, *, enabled: bool = True, console: Console | None = None) -> AbstractContextManager:
    """A spinner while slow non-step work (loading a model) runs."""
    if not enabled:
        return nullcontext()
    return (console or _stderr_console()).status(message)
