"""The progress bar of a training run: loss, learning rate, tokens/s, MFU, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ftkit.common.console import _stderr_console
from ftkit.train.callbacks import TrainingCallback


def _tokens(rate: float) -> str:
    return f"{rate / 1000:.1f}k tok/s" if rate >= 1000 else f"{rate:.0f} tok/s"


def _mfu(mfu: float | None, flops_per_sec: float | None) -> str:
    """MFU as a percentage (ftkit.train.flops), else the achieved FLOP/s where no peak is known."""
    if mfu is not None:
        return f"MFU {100 * mfu:.1f}%" if mfu >= 0.001 else f"MFU {100 * mfu:.2g}%"
    if flops_per_sec is None:
        return ""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops_per_sec >= scale:
            return f"{flops_per_sec / scale:.1f} {unit}FLOP/s"
    return f"{flops_per_sec:.0f} FLOP/s"


class TrainProgress:
    """The training bar: description, bar, step/total, loss, lr, tokens/s, MFU, elapsed, ETA.

    With `enabled=False` there is no bar; `log` still prints (to stderr).
    """

    def __init__(
        self,
        total: int,
        *,
        description: str = "train",
        start: int = 0,
        enabled: bool = True,
        console: Console | None = None,
    ):
        self.enabled = enabled
        self.console = console or _stderr_console()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[pref]}"),
            TextColumn("{task.fields[lr]}"),
            TextColumn("{task.fields[tps]}"),
            TextColumn("{task.fields[mfu]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, loss="", pref="", lr="", tps="", mfu="")

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(
        self,
        step: int,
        loss: float | None = None,
        lr: float | None = None,
        tokens_per_sec: float | None = None,
        mfu: float | None = None,
        flops_per_sec: float | None = None,
        accuracy: float | None = None,
        margin: float | None = None,
    ) -> None:
        # Fields left out keep their last value: loss is reported every few steps, the bar moves every step.
        fields = {}
        if loss is not None:
            fields["loss"] = f"loss {loss:.4f}"
        if accuracy is not None:  # a preference objective: TRL's rewards/accuracies and rewards/margins
            fields["pref"] = f"acc {accuracy:.2f} margin {margin:+.3f}"
        if lr is not None:
            fields["lr"] = f"lr {lr:.2e}"
        if tokens_per_sec is not None:
            fields["tps"] = _tokens(tokens_per_sec)
        if mfu is not None or flops_per_sec is not None:
            fields["mfu"] = _mfu(mfu, flops_per_sec)
        self._progress.update(self._task, completed=step, **fields)
        if self.enabled and loss is not None and not self.console.is_terminal:
            # No live bar in a log file or CI: one line per report instead.
            total = self._progress.tasks[0].total
            self.console.print(f"step {step}/{total}: " + ", ".join(fields.values()))

    def log(self, message: str) -> None:
        """Print above the bar (the bar redraws below it)."""
        if self.enabled:
            self.console.print(message)


class ProgressCallback(TrainingCallback):
    """The bar over a run's optimizer steps, and its validation losses printed above it."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.bar: TrainProgress | None = None

    def on_train_begin(self, step: int) -> None:
        # Made here, not earlier: the bar's clock starts with the first step, not with the model load.
        self.bar = TrainProgress(self.total, start=step, enabled=self.enabled).__enter__()

    def on_step_end(self, step: int, lr: float) -> None:
        self.bar.update(step, lr=lr)

    def on_report(self, record: dict) -> None:
        self.bar.update(record["step"], loss=record["loss"], lr=record["lr"], tokens_per_sec=record["tokens_per_sec"],
                        mfu=record.get("mfu"), flops_per_sec=record.get("flops_per_sec"),
                        accuracy=record.get("rewards/accuracies"), margin=record.get("rewards/margins"))

    def on_eval(self, record: dict) -> None:
        message = f"step {record['step']}: validation loss {record['loss']:.4f}"
        if "rewards/accuracies" in record:
            message += f", reward accuracy {record['rewards/accuracies']:.3f}, margin {record['rewards/margins']:+.4f}"
        if self.bar is not None:
            self.bar.log(message)
        elif self.enabled:  # the validation before training: no bar yet
            _stderr_console().print(message)

    def on_train_end(self, step: int) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
