"""Validation over a split: the loss, token-weighted like training; a preference objective's loss and metrics per pair."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftkit.backend.objectives import Preference, numpy_terms
from ftkit.backend.protocol import Backend
from ftkit.common.distributed import World
from ftkit.data import batching
from ftkit.data.batch import Example, Pair


def value(x: Any) -> float:
    """A backend's number (a float, or a lazy device scalar) as a float: the only place the loop waits for the device."""
    return float(x.item()) if hasattr(x, "item") else float(x)


def evaluate(backend: Backend, examples: Sequence[Example], batch_size: int, pad_id: int, max_batches: int | None = None,
             world: World = World(), packing: bool = False) -> float:
    """Token-weighted mean loss over the examples (every target token counts once), the micro-batches
    shared among the run's processes. `max_batches` counts batches of `batch_size` examples."""
    if max_batches is not None:
        examples = examples[: max_batches * batch_size]
    part = batching.share(examples, batch_size, pad_id, packing, world)
    total, n = 0.0, 0
    for i in range(part.runs):
        if i < len(part.batches):
            total += backend.eval_loss(part.batches[i])
            n += part.batches[i].n_targets
        else:
            # FSDP gathers weights inside every forward, so all processes run as many; this one is not counted.
            backend.eval_loss(part.filler())
    total, n = backend.reduce_sum([total, n])
    return total / n if n else float("nan")


def evaluate_pairs(backend: Backend, pairs: Sequence[Pair], batch_size: int, pad_id: int, max_batches: int | None = None,
                   world: World = World(), packing: bool = False, pref: Preference | None = None,
                   reference: dict[int, Any] | None = None) -> dict[str, float]:
    """The preference loss and metrics (`pref.metric_names`), each a mean over the pairs, from the policy's log-probs
    (and for DPO the reference's: they never change, so `reference` keeps them per micro-batch between calls)."""
    if max_batches is not None:
        pairs = pairs[: max_batches * batch_size]
    part = batching.share(pairs, batch_size, pad_id, packing, world)
    names, reference = pref.metric_names, {} if reference is None else reference
    sums, n = dict.fromkeys(names, 0.0), 0
    for i in range(part.runs):
        batch = part.batches[i] if i < len(part.batches) else part.filler()
        logps = backend.sequence_logps(batch)  # every process runs as many passes (FSDP gathers inside each)
        if pref.uses_reference and i not in reference:
            reference[i] = backend.sequence_logps(batch, reference=True)
        if i < len(part.batches):
            terms = numpy_terms(pref, logps, batch.tokens_per_sequence, reference.get(i))
            for k in names:
                sums[k] += float(terms[k].sum())
            n += batch.n_pairs
    *totals, n = backend.reduce_sum([sums[k] for k in names] + [n])
    return {k: (v / n if n else float("nan")) for k, v in zip(names, totals)}
