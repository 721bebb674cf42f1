"""Which examples a step trains on, and how they become micro-batches in each process.

The order is a pure function of (seed, position in the example stream), so a resumed run needs only
its position. A step's examples become micro-batches either packed (ftkit.packing: several examples
per row, no padding to speak of) or padded (`batch_size` examples per micro-batch). Every process of
a run builds the same step and runs the same number of micro-batches (DDP and FSDP need every
process in every collective); one with fewer real ones repeats one with weight 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ftkit.common.distributed import World
from ftkit.data.batch import Batch, Example, Pair, PairBatch, make_batch
from ftkit.data.packing import packed_micro_batches
from ftkit.data.pairs import pair_micro_batches

# Examples per length group, in steps: HF's LengthGroupedSampler sorts mega-batches of 50 batches.
GROUP_STEPS = 50


def epoch_order(n: int, seed: int, epoch: int, lengths: Sequence[int] | None = None, step_size: int = 1) -> np.ndarray:
    """A seeded permutation of range(n) for one epoch.

    With `lengths` (length grouping): the permutation is cut into groups of GROUP_STEPS steps, each
    group sorted longest first and cut into steps, and the steps of a group shuffled, so a step holds
    examples of similar length (little padding) and every example still comes once per epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    if lengths is None:
        return perm
    group = GROUP_STEPS * step_size
    out = []
    for start in range(0, n, group):
        chunk = sorted(perm[start : start + group].tolist(), key=lambda i: -lengths[i])
        steps = [chunk[j : j + step_size] for j in range(0, len(chunk), step_size)]
        for k in rng.permutation(len(steps)):
            out += steps[k]
    return np.asarray(out)


def step_indices(n: int, seed: int, position: int, size: int, lengths: Sequence[int] | None = None,
                 step_size: int | None = None) -> list[int]:
    """Example indices [position, position + size) of the stream of per-epoch orders; `lengths`
    groups them by length into steps of `step_size` examples (default: `size`)."""
    out, orders = [], {}
    for p in range(position, position + size):
        epoch = p // n
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch, lengths, step_size or size)
        out.append(int(orders[epoch][p % n]))
    return out


def step_note(n_train: int, batch_size: int, grad_accum: int = 1, processes: int = 1) -> str | None:
    """Fewer training examples than one step takes: a warning, not an error.

    The run is still well defined (a step takes the next examples of the seeded stream, so it holds
    some examples twice, and every example keeps the same weight over the run), and a handful of rows
    is what a smoke test uses; but an "epoch" is then more than one pass, which the recipe did not say.
    """
    per_step = batch_size * grad_accum * processes
    if n_train >= per_step:
        return None
    parts = f"train.batch_size = {batch_size}" + (f" x train.grad_accum = {grad_accum}" if grad_accum > 1 else "") + (
        f" x {processes} processes" if processes > 1 else "")
    return (f"{n_train} training examples, but one step takes {per_step} ({parts}): each step repeats examples "
            f"({per_step / n_train:.1f} passes over the data per step). Set train.batch_size to {max(1, n_train // (grad_accum * processes))} "
            "or less, or add data.")


def micro_batches(examples: Sequence[Example] | Sequence[Pair], batch_size: int, pad_id: int | None, packing: bool) -> list[Batch] | list[PairBatch]:
    if examples and isinstance(examples[0], Pair):
        return pair_micro_batches(examples, batch_size, pad_id, packing)
    if packing:
        return packed_micro_batches(examples, batch_size, pad_id)
    return [make_batch(list(examples[j : j + batch_size]), pad_id) for j in range(0, len(examples), batch_size)]


@dataclass
class Share:
    """One process's part of a step (or of a validation pass)."""

    batches: list[Batch] | list[PairBatch]  # this process's micro-batches
    runs: int  # how many micro-batches every process runs (the largest share)
    targets: int  # target tokens of all the examples, over all processes
    tokens: int  # their non-padding tokens
    spare: Batch | PairBatch | None = None  # for a process that got no micro-batch at all
    pairs: int = 0  # preference pairs (each counts once in the loss: the step's weight), 0 for SFT examples

    @property
    def weight(self) -> int:
        """What the step's loss is a mean over: target tokens (SFT, token-weighted) or pairs (preference)."""
        return self.pairs or self.targets

    def filler(self) -> Batch:
        """What a process with fewer micro-batches runs, with weight 0, to keep in step with the others."""
        return self.batches[0] if self.batches else self.spare


def share(examples: Sequence[Example], batch_size: int, pad_id: int | None, packing: bool, world: World) -> Share:
    """This process's micro-batches of `examples`.

    Padded: the micro-batches are made from all examples alike and dealt round (the micro-batch is the
    unit, as in one process). Packed: each process packs every n-th example itself, so that each
    packs as tightly as one process would.
    """
    pairs = len(examples) if examples and isinstance(examples[0], Pair) else 0
    seqs = [s for p in examples for s in (p.chosen, p.rejected)] if pairs else examples
    targets = sum(int(sum(e.mask[1:])) for e in seqs)
    tokens = sum(len(e.ids) - 1 for e in seqs)
    if world.size == 1:
        mine = micro_batches(examples, batch_size, pad_id, packing)
        return Share(mine, len(mine), targets, tokens, pairs=pairs)
    if packing:
        parts = [micro_batches(examples[r :: world.size], batch_size, pad_id, True) if examples[r :: world.size] else []
                 for r in range(world.size)]
        mine, runs = parts[world.rank], max(len(p) for p in parts)
    else:
        every = micro_batches(examples, batch_size, pad_id, False)
        mine, runs = world.share(every), -(-len(every) // world.size)
    spare = None if mine else micro_batches(examples[:1], batch_size, pad_id, packing)[0]
    return Share(mine, runs, targets, tokens, spare, pairs)
