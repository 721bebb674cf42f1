"""Did-you-mean, once for every message that names an unknown word."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, options: Iterable[str]) -> str | None:
    """The option `word` was most likely meant to be (difflib's ratio >= 0.6), or None."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """" Did you mean 'x'?" to append to a message, or "" when nothing is close."""
    close = closest(word, options)
    return f" Did you mean '{close}'?" if close else ""
