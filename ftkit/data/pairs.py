"""Preference pairs as micro-batches: each pair's two sequences (prompt + chosen, prompt + rejected), padded
one a row or packed several a row, with the map from every target position to its sequence (PairBatch).

`batch_size` counts pairs, as TRL's per-device batch does: a padded micro-batch has 2 x batch_size rows.
Packing puts whole sequences into rows no longer than the longest sequence (ftkit.data.packing), so a pair's
two sequences may share a row or not; the per-sequence sums are the same either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ftkit.common.errors import DataError
from ftkit.data.batch import Example, Pair, PairBatch, make_batch
from ftkit.data.packing import pack_rows, packed_batch


def _sequences(pairs: Sequence[Pair]) -> list[Example]:
    out = []
    for p in pairs:
        out += [p.chosen, p.rejected]
    return out


def _check(pb: PairBatch) -> PairBatch:
    counts = pb.tokens_per_sequence
    if (counts == 0).any():
        i = int(np.flatnonzero(counts == 0)[0])
        raise DataError(f"a preference batch holds a {'rejected' if i % 2 else 'chosen'} response with no target token "
                        f"(pair {i // 2} of the batch): its log-probability would be a silent zero.")
    return pb


def pair_batch(pairs: Sequence[Pair], pad_id: int | None) -> PairBatch:
    """One sequence a row: rows 2i and 2i + 1 are pair i's chosen and rejected."""
    seqs = _sequences(pairs)
    batch = make_batch(seqs, 0 if pad_id is None else pad_id)
    sequence = np.where(batch.mask > 0, np.arange(len(seqs), dtype=np.int32)[:, None], -1).astype(np.int32)
    return _check(PairBatch(batch, sequence, len(pairs)))


def packed_pair_batch(pairs: Sequence[Pair], rows: list[list[int]], pad_id: int | None) -> PairBatch:
    """`rows`: sequence indices (2i chosen, 2i + 1 rejected of `pairs`) per row, as ftkit.data.packing lays them out."""
    seqs = _sequences(pairs)
    batch = packed_batch(seqs, rows, pad_id)
    sequence = np.full(batch.mask.shape, -1, dtype=np.int32)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(seqs[i].ids) - 1
            sequence[r, at : at + n] = i
            at += n
    sequence[batch.mask == 0] = -1
    return _check(PairBatch(batch, sequence, len(pairs)))


def pair_micro_batches(pairs: Sequence[Pair], batch_size: int, pad_id: int | None, packing: bool) -> list[PairBatch]:
    """The step's pairs, `batch_size` pairs a micro-batch."""
    if not pairs:
        raise DataError("pair_micro_batches: no pairs.")
    out = []
    for j in range(0, len(pairs), batch_size):
        chunk = list(pairs[j : j + batch_size])
        if not packing:
            out.append(pair_batch(chunk, pad_id))
            continue
        lengths = [len(s.ids) - 1 for s in _sequences(chunk)]
        rows = pack_rows(lengths, max(lengths))
        out.append(pair_batch(chunk, pad_id) if all(len(r) == 1 for r in rows) else packed_pair_batch(chunk, rows, pad_id))
    return out
