"""The run's metrics log (`metrics.jsonl`, one JSON object per line) and the loss plot drawn from it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ftkit.common.atomic import atomic_file, write_text_atomic
from ftkit.train.callbacks import TrainingCallback

FILENAME = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    # Backends hand back numpy or torch scalars; both have .item().
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class MetricsLog:
    """Appends records like {"step", "kind", "loss", "lr", ...} to `<run_dir>/metrics.jsonl`.

    Each line is flushed as it is written, so a crashed run keeps everything up to its last step.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, trackers: Any = None):
        self.path = Path(run_dir) / FILENAME
        self.enabled = enabled  # off in all but the first process of a multi-process run
        self._file = None
        # ftkit.tracking.Trackers (W&B, TensorBoard, MLflow), fed every record written here.
        self.trackers = trackers if enabled else None
        self._sent_until = -1  # steps up to this reached the trackers in an earlier process of this run

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        line = json.dumps({**record, "time": time.time()}, default=_jsonable)
        self._file.write(line + "\n")
        self._file.flush()
        if self.trackers is not None and (record.get("kind") == "run" or (record.get("step") or 0) > self._sent_until):
            self.trackers.log(record)

    def _note_sent(self) -> None:
        """Before the log is cut back for a resume: what it holds was already sent to the trackers."""
        # Only a run whose trackers were started before (trackers.json) continues their runs.
        if self.trackers is not None and self.path.exists() and (self.path.parent / "trackers.json").exists():
            steps = [r["step"] for r in self.read(self.path) if isinstance(r.get("step"), int) and r.get("kind") != "run"]
            self._sent_until = max(steps, default=-1)

    def truncate_after(self, step: int) -> None:
        """Keep only records with step <= `step`: a resumed run re-logs the steps after its checkpoint."""
        self._close_file()
        if not self.enabled or not self.path.exists():
            return
        self._note_sent()
        kept = [r for r in self.read(self.path) if r.get("step") is None or r["step"] <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def clear(self) -> None:
        """Start the log afresh: a run killed before its first checkpoint starts again from step 0."""
        self._close_file()
        if self.enabled:
            self._note_sent()
            self.path.unlink(missing_ok=True)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self, ok: bool = True) -> None:
        """Close the file and finish the tracker runs (`ok` False marks them failed)."""
        self._close_file()
        if self.trackers is not None:
            self.trackers.close(ok)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ok=exc_type is None)

    @staticmethod
    def read(path: str | Path) -> list[dict[str, Any]]:
        records = []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # A run killed mid-write leaves a partial last line; the rest is still good.
                continue
        return records


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str | None = None) -> Path | None:
    """Training loss (line) and validation loss (markers) against step; None when there is nothing to plot."""
    records = MetricsLog.read(metrics_path) if Path(metrics_path).exists() else []
    points = {
        kind: [(r["step"], r["loss"]) for r in records if r.get("kind") == kind and r.get("loss") is not None]
        for kind in ("train", "valid")
    }
    if not points["train"] and not points["valid"]:
        return None

    # Imported here so that the CLI starts fast and no GUI backend is ever chosen.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: slow to import
    from matplotlib.figure import Figure  # lazy: slow to import

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points["train"]:
        steps, losses = zip(*points["train"])
        ax.plot(steps, losses, linewidth=1, alpha=0.8, label="train")
    if points["valid"]:
        steps, losses = zip(*points["valid"])
        ax.plot(steps, losses, "o-", markersize=5, linewidth=1.5, label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()

    png_path = Path(png_path)
    with atomic_file(png_path, "wb") as f:  # a viewer never sees a half-written image
        fig.savefig(f, format="png")
    return png_path


class MetricsCallback(TrainingCallback):
    """A run's records into its metrics log (and through the log to the trackers); the loss plot at the end."""

    def __init__(self, log: MetricsLog, png_path: Path, name: str | None):
        self.log, self.png_path = log, png_path
        self.title = name

    def on_start(self, step: int, resumed: bool) -> None:
        if resumed:
            self.log.truncate_after(step)
        else:
            self.log.clear()  # what a run killed before its first checkpoint logged is trained again

    def on_run(self, record: dict[str, Any]) -> None:
        self.title = f"{self.title} ({record['backend']})"
        self.log.log(record)

    def on_report(self, record: dict[str, Any]) -> None:
        self.log.log(record)

    def on_eval(self, record: dict[str, Any]) -> None:
        self.log.log(record)

    def on_end(self, ok: bool) -> None:
        if ok and self.log.enabled:
            plot_losses(self.log.path, self.png_path, title=self.title)
        self.log.close(ok)
