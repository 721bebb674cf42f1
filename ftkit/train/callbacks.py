"""What the training loop tells whoever watches it: the metrics log, the progress bar, a caller's own hook.

The loop decides when to report, validate and save; a callback only hears about it, the way mlx-lm's
`train(..., training_callback=)` does. Every hook is a no-op here: subclass and override the ones you need.
Every process of a multi-process run calls its callbacks; `world.is_main` in the caller tells the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


class TrainingCallback:
    """The hooks, in the order a run calls them."""

    def on_start(self, step: int, resumed: bool) -> None:
        """The run starts after `step` (0, or the step of the checkpoint it resumes from), before the model loads."""

    def on_run(self, record: dict[str, Any]) -> None:
        """The run record (backend, device, parameters, switches, hardware), once the model is loaded."""

    def on_train_begin(self, step: int) -> None:
        """The optimizer steps begin after `step` (after the validation before training, if any)."""

    def on_step_end(self, step: int, lr: float) -> None:
        """An optimizer step is done; its report, validation and checkpoint follow."""

    def on_report(self, record: dict[str, Any]) -> None:
        """A training record: loss, lr, tokens/s over the steps since the last report, the backend's stats."""

    def on_eval(self, record: dict[str, Any]) -> None:
        """A validation loss; step 0 is the one before training."""

    def on_save(self, step: int, path: Path) -> None:
        """A checkpoint, or the final adapter folder, is complete at `path`."""

    def on_train_end(self, step: int) -> None:
        """The optimizer steps stopped after `step`, whether they ran out, were cut short, or failed."""

    def on_end(self, ok: bool) -> None:
        """The run is over (`ok` False: it failed, setup included); called exactly once."""


class CallbackList(TrainingCallback):
    """Several callbacks as one, called in the order given."""

    def __init__(self, callbacks: Iterable[TrainingCallback]):
        self.callbacks = list(callbacks)

    def _each(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_start(self, step: int, resumed: bool) -> None:
        self._each("on_start", step, resumed)

    def on_run(self, record: dict[str, Any]) -> None:
        self._each("on_run", record)

    def on_train_begin(self, step: int) -> None:
        self._each("on_train_begin", step)

    def on_step_end(self, step: int, lr: float) -> None:
        self._each("on_step_end", step, lr)

    def on_report(self, record: dict[str, Any]) -> None:
        self._each("on_report", record)

    def on_eval(self, record: dict[str, Any]) -> None:
        self._each("on_eval", record)

    def on_save(self, step: int, path: Path) -> None:
        self._each("on_save", step, path)

    def on_train_end(self, step: int) -> None:
        self._each("on_train_end", step)

    def on_end(self, ok: bool) -> None:
        self._each("on_end", ok)
