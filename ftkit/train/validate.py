"""Validation loss over a split, token-weighted like training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftkit.backend.protocol import Backend
from ftkit.common.distributed import World
from ftkit.data import batching
from ftkit.data.batch import Example


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
