"""Examples, splits and the padded batch every backend consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

from dataclasses import field
from typing import TYPE_CHECKING

import numpy as np

from ftkit.common.errors import DataError

if TYPE_CHECKING:
    pass


@dataclass
class Batch:
    """One micro-batch, already shifted: the model reads `inputs[:, t]` and should predict `targets[:, t]`.

    `mask[:, t]` is 1.0 where that prediction counts toward the loss; `attention_mask` marks real
    (non-padding) input tokens.
    """

    inputs: "np.ndarray"  # int32 [B, T]
    targets: "np.ndarray"  # int32 [B, T]
    mask: "np.ndarray"  # float32 [B, T]
    attention_mask: "np.ndarray"  # int32 [B, T]
    # Packed rows (ftkit.packing): each token's position within its example, restarting at 0 where
    # an example starts. Attention must stay inside each example; None for one example per row.
    positions: "np.ndarray | None" = None

    @property
    def n_targets(self) -> int:
        return int(self.mask.sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 where token i is a training target (its prediction counts toward the loss)
    truncated: bool = False
    # Tokens before truncation, where known (freshly encoded; the cache keeps only the split's percentiles).
    length: int | None = field(default=None, compare=False, repr=False)


@dataclass
class Splits:
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    format: str  # "text" | "completion" | "chat"
    train_on: str  # resolved: "completion" | "all"
    n_truncated: dict[str, int] = field(default_factory=dict)  # per split, dropped examples included
    sources: dict[str, str] = field(default_factory=dict)  # per split: where its rows came from
    n_dropped: dict[str, int] = field(default_factory=dict)  # per split: examples with no target token
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)  # per split: p50, p90, p99, max tokens before truncation
    dropped_where: dict[str, list[str]] = field(default_factory=dict)  # per split: the first dropped rows, each with why
    n_prompt_cut: dict[str, int] = field(default_factory=dict)  # preference pairs: per split, prompts cut from the left


@dataclass
class Pair:
    """One preference example: prompt + chosen and prompt + rejected, each an Example whose mask marks its
    response (the prompt is the same token ids in both)."""

    chosen: Example
    rejected: Example
    truncated: bool = False

    @property
    def ids(self) -> list[int]:  # what length-based code (packing, grouping, stats) measures: both sequences
        return self.chosen.ids + self.rejected.ids


@dataclass
class PairBatch:
    """A micro-batch of preference pairs: their 2 x pairs sequences laid out in `batch`'s rows (padded: one
    sequence a row; packed: several, with `batch.positions`). `sequence[r, t]` says which sequence the target
    at (r, t) belongs to: 2i is pair i's chosen, 2i + 1 its rejected; -1 where the mask is 0."""

    batch: Batch
    sequence: "np.ndarray"  # int32 [B, T]
    n_pairs: int

    @property
    def tokens_per_sequence(self) -> "np.ndarray":
        """float64 [2 x pairs]: each sequence's target-token count."""
        seq = self.sequence[self.sequence >= 0]
        return np.bincount(seq, minlength=2 * self.n_pairs).astype(np.float64)

    @property
    def n_targets(self) -> int:
        return self.batch.n_targets

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens


def check_batch(batch: Batch) -> Batch:
    if batch.n_targets == 0:
        raise DataError(
            f"a batch of {batch.inputs.shape[0]} examples has no target token: a batch whose mask is all zero "
            "is an error, not a silent no-op."
        )
    return batch


def make_batch(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded and shifted: inputs = ids[:-1], targets = ids[1:], mask = mask[1:]."""
    if not examples:
        raise DataError("make_batch: no examples.")
    pad = 0 if pad_id is None else int(pad_id)  # padding is masked out of loss and attention; any id works
    shape = (len(examples), max(max(len(e.ids) for e in examples) - 1, 0))
    inputs = np.full(shape, pad, dtype=np.int32)
    targets = np.full(shape, pad, dtype=np.int32)
    mask = np.zeros(shape, dtype=np.float32)
    attention = np.zeros(shape, dtype=np.int32)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        if n > 0:
            inputs[b, :n] = e.ids[:-1]
            targets[b, :n] = e.ids[1:]
            mask[b, :n] = e.mask[1:]
            attention[b, :n] = 1
    return check_batch(Batch(inputs, targets, mask, attention))
