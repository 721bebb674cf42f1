"""What `ftkit data summary` shows: examples per split, token-length percentiles, truncation."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ftkit.data.batch import Splits
from ftkit.data.rows import SPLITS

if TYPE_CHECKING:
    pass


def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest rank: always one of the values (an actual example length)."""
    if not sorted_values:
        return 0
    return sorted_values[max(math.ceil(p / 100 * len(sorted_values)) - 1, 0)]


def summarize(splits: Splits, max_seq_length: int) -> dict:
    """Per split: count, token-length percentiles (after truncation), tokens, target tokens, truncated, dropped.

    `truncated` also counts examples longer than `max_seq_length` when that is lower than the one the
    splits were built with.
    """
    out = {}
    for split in SPLITS:
        examples = getattr(splits, split)
        lengths = sorted(len(e.ids) for e in examples)
        out[split] = {
            "count": len(examples),
            "p50": _percentile(lengths, 50),
            "p90": _percentile(lengths, 90),
            "p99": _percentile(lengths, 99),
            "max": lengths[-1] if lengths else 0,
            "tokens": sum(lengths),
            "target_tokens": sum(sum(e.mask[1:]) for e in examples),
            "truncated": splits.n_truncated.get(split, 0)
            + sum(1 for e in examples if not e.truncated and len(e.ids) > max_seq_length),
            "dropped": splits.n_dropped.get(split, 0),
        }
    return out
