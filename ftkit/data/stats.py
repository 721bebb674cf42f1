"""What `ftkit data summary` shows: examples per split, token-length percentiles, truncation."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ftkit.data.batch import Splits
from ftkit.data.preference import FORMAT as PREFERENCE
from ftkit.data.preference import longest, sequences
from ftkit.data.rows import SPLITS

if TYPE_CHECKING:
    from ftkit.recipe.schema import DataSection


def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest rank: always one of the values (an actual example length)."""
    if not sorted_values:
        return 0
    return sorted_values[max(math.ceil(p / 100 * len(sorted_values)) - 1, 0)]


def summarize(splits: Splits, max_seq_length: int) -> dict:
    """Per split: count, token-length percentiles (after truncation), tokens, target tokens, truncated, dropped.

    `truncated` also counts examples longer than `max_seq_length` when that is lower than the one the
    splits were built with. Preference pairs: a pair is an example, its length its longer sequence's, its
    tokens both sequences'.
    """
    out = {}
    for split in SPLITS:
        examples = getattr(splits, split)
        per = longest(examples)
        lengths, seqs = sorted(per), sequences(examples)
        out[split] = {
            "count": len(examples),
            "p50": _percentile(lengths, 50),
            "p90": _percentile(lengths, 90),
            "p99": _percentile(lengths, 99),
            "max": lengths[-1] if lengths else 0,
            "tokens": sum(len(e.ids) for e in seqs),
            "target_tokens": sum(sum(e.mask[1:]) for e in seqs),
            "truncated": splits.n_truncated.get(split, 0)
            + sum(1 for e, n in zip(examples, per) if not e.truncated and n > max_seq_length),
            "dropped": splits.n_dropped.get(split, 0),
        }
    return out


def notes(splits: Splits, data: DataSection, limit: int | None = None) -> list[str]:
    """What the data does that the recipe did not ask for in so many words, one sentence each: examples
    cut to data.max_seq_length (with the lengths that would keep them whole), examples left out for
    having no token to train on (how many, why, where), and a valid file with no rows. Said on every
    run, from the tokenized splits, whether they were tokenized now or read from the cache. `limit`: the
    model's context, which no suggested max_seq_length passes."""
    out = []
    pairs = splits.format == PREFERENCE
    noun = "pairs" if pairs else "examples"
    for split in SPLITS:
        n = len(getattr(splits, split)) + splits.n_dropped.get(split, 0)
        cut = splits.n_truncated.get(split, 0)
        if cut:
            pct = splits.lengths.get(split) or {}
            spread = ""
            if pct:
                keeps = "keeps them all whole" if pct["p99"] == pct["max"] else "keeps 99% whole"
                fix = (f"data.max_seq_length = {pct['p99']} {keeps}" if limit is None or pct["p99"] <= limit
                       else f"the model takes at most {limit} tokens (data.max_seq_length = {limit})")
                spread = (f" Their lengths before cutting: p50 {pct['p50']}, p90 {pct['p90']}, p99 {pct['p99']}, "
                          f"max {pct['max']} tokens; {fix}.")
            how = (": their prompts are kept and their responses cut to it, as TRL does" if pairs
                   else " and are cut to it (their ends are not trained on)")
            out.append(f"{cut} of {n} {split} {noun} ({100 * cut / max(n, 1):.0f}%) are longer than data.max_seq_length = "
                       f"{data.max_seq_length}{how}.{spread}")
        prompts = splits.n_prompt_cut.get(split, 0)
        if prompts:
            out.append(f"{prompts} of {n} {split} pairs have a prompt of data.max_seq_length = {data.max_seq_length} tokens or "
                       f"more, which leaves no room for a response: those prompts keep only their last {data.max_seq_length // 2} "
                       "tokens (cut from the left).")
        dropped = splits.n_dropped.get(split, 0)
        if dropped:
            where = "; ".join(splits.dropped_where.get(split, []))
            why = "are left out" if pairs else f"have no token to train on (loss on {splits.train_on}) and are left out"
            out.append(f"{dropped} of {n} {split} {noun} {why}"
                       f"{': ' + where if where else ''}{' ...' if dropped > len(splits.dropped_where.get(split, [])) else ''}.")
    source = splits.sources.get("valid", "(none)")
    if not splits.valid and not splits.n_dropped.get("valid") and source != "(none)":
        out.append(f"{source}: the valid split has no rows, so this run reports no validation loss. Add rows to it, or remove "
                   f"the file to hold out data.valid_fraction ({data.valid_fraction}) of the training rows.")
    return out
