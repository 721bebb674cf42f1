"""Experiment trackers: W&B, TensorBoard and MLflow, fed from the run's metrics log.

`MetricsLog` hands every record to a `Trackers` fan-out: the "run" record (backend, device, switches,
hardware) opens the tracker runs with the resolved recipe as their config, and each "train", "valid"
(or any other kind of) record is logged as `<kind>/<key>` for every numeric key it carries: loss, lr,
tokens_per_sec, flops_per_sec and mfu (ftkit.train.flops; the peak they use is in the run config),
grad_norm, peak_memory_gib, task metrics. The tracker packages are optional extras,
imported only here and only when a recipe asks for them.

A resumed run continues the same tracker runs: their ids are kept in `<run_dir>/trackers.json`. A
resume starts again from the last checkpoint and re-logs the steps after it; those steps were sent
to the trackers already (with the same values: resume is exact), so the fan-out skips them.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from ftkit.backend.hardware import detect
from ftkit.common.atomic import write_json_atomic
from ftkit.common.errors import FtkitError

STATE_FILE = "trackers.json"


# (module to import, what to install)
PACKAGES = {
    "wandb": (["wandb"], "pip install 'ftkit[wandb]'  (or: pip install wandb)"),
    "tensorboard": (["tensorboard"], "pip install 'ftkit[tensorboard]'  (or: pip install tensorboard)"),
    "mlflow": (["mlflow"], "pip install 'ftkit[mlflow]'  (or: pip install mlflow)"),
}


# MLflow's local store is a SQLite file; its SQL layer is not part of mlflow-skinny.
_MLFLOW_SQL = ["sqlalchemy", "alembic"]


_SKIP_KEYS = {"step", "kind", "time"}


def mlflow_uri(log) -> str:
    """The recipe's URI, else $MLFLOW_TRACKING_URI, else a local SQLite store in the working directory
    (what `mlflow ui` started there shows). MLflow 3 keeps its file store (./mlruns) behind an opt-in."""
    return log.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def require(recipes) -> None:
    """Every tracker the recipes ask for is importable: checked before any data is read or model loaded."""
    problems = []
    for recipe in recipes:
        for name in recipe.log.report_to:
            modules, hint = PACKAGES[name]
            if name == "mlflow" and mlflow_uri(recipe.log).startswith("sqlite:"):
                modules = modules + _MLFLOW_SQL
            missing = [m for m in modules if importlib.util.find_spec(m) is None]
            if missing:
                problems.append(f"{recipe.name}: log.report_to has {name!r}, but {', '.join(missing)} is not installed: "
                                f"{hint}; or drop {name!r} from log.report_to.")
    if problems:
        raise FtkitError("\n".join(problems))


def hardware_summary() -> dict[str, Any]:
    """The machine a run trained on: the loop puts it in the run record, the trackers' config takes it from there."""
    info = detect()
    gpus = [{"name": g["name"], "memory_gib": round(g["memory_bytes"] / 2**30, 1) if g.get("memory_bytes") else None}
            for g in info["cuda"]["devices"]]
    return {
        "os": info["os"], "machine": info["machine"], "python": info["python"], "cpu": info["cpu"],
        "cores_physical": info["cores_physical"], "cores_logical": info["cores_logical"],
        "ram_gib": round(info["ram_bytes"] / 2**30, 1) if info["ram_bytes"] else None,
        "gpus": gpus, "apple_silicon": info["apple_silicon"],
        "packages": {k: v for k, v in info["packages"].items() if v},
    }


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """`<kind>/<key>` -> value for every finite number in a record (bools and text left out); nested
    tables as `<kind>/<key>/<subkey>` (per-task metrics: valid/tasks/banking77/accuracy)."""
    kind = record.get("kind") or "metrics"
    out: dict[str, float] = {}

    def walk(prefix: str, d: dict[str, Any], top: bool) -> None:
        for key, value in d.items():
            if (top and key in _SKIP_KEYS) or isinstance(value, bool):
                continue
            if isinstance(value, dict):
                walk(f"{prefix}/{key}", value, False)
                continue
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{prefix}/{key}"] = float(value)

    walk(kind, record, True)
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int | None) -> None: ...
    def finish(self, ok: bool) -> None: ...


class WandbTracker:
    def __init__(self, recipe, run_dir: Path, config: dict[str, Any], saved: dict[str, Any]):
        import wandb  # lazy: optional tracker

        log = recipe.log
        # A sweep agent (`ftkit sweep --wandb-agent`) opened the run this trial logs into.
        self.own = wandb.run is None
        if self.own:
            self.run = wandb.init(
                project=log.project, entity=log.entity, name=log.run_name or recipe.name, tags=log.tags or None,
                group=log.group, config=config, dir=str(run_dir), id=saved.get("id"), resume="allow",
                mode=None if log.wandb_mode == "auto" else log.wandb_mode, job_type="train",
            )
        else:
            self.run = wandb.run
            self.run.config.update(config, allow_val_change=True)
        self.state = {"id": self.run.id, "project": self.run.project, "dir": str(Path(self.run.dir).parent)}

    def log(self, metrics: dict[str, float], step: int | None) -> None:
        if metrics:
            self.run.log(metrics, step=step)

    def finish(self, ok: bool) -> None:
        if self.own:
            self.run.finish(exit_code=0 if ok else 1)


class TensorBoardTracker:
    """Event files written with tensorboard's own writer and protos (no torch or TensorFlow needed)."""

    def __init__(self, recipe, run_dir: Path, config: dict[str, Any], saved: dict[str, Any]):
        from tensorboard.summary.writer.event_file_writer import (
            EventFileWriter,  # lazy: optional tracker
        )

        self.dir = Path(recipe.log.tensorboard_dir or run_dir / "tensorboard")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(self.dir))
        self.state = {"dir": str(self.dir)}
        # Markdown, as the text dashboard renders it.
        self._text("recipe", "```toml\n" + recipe.to_toml() + "\n```")
        about = {"run": config.get("run", {}), "hardware": config.get("hardware", {})}
        self._text("run", "```json\n" + json.dumps(about, indent=2, default=str) + "\n```")

    def _event(self, step: int | None, values: list) -> None:

        from tensorboard.compat.proto.event_pb2 import Event  # lazy: optional tracker
        from tensorboard.compat.proto.summary_pb2 import (
            Summary,  # lazy: optional tracker
        )

        self.writer.add_event(Event(wall_time=time.time(), step=step or 0, summary=Summary(value=values)))

    def _text(self, tag: str, text: str) -> None:
        from tensorboard.compat.proto.summary_pb2 import (  # lazy: optional tracker
            Summary,
            SummaryMetadata,
        )
        from tensorboard.compat.proto.tensor_pb2 import (
            TensorProto,  # lazy: optional tracker
        )
        from tensorboard.compat.proto.tensor_shape_pb2 import (
            TensorShapeProto,  # lazy: optional tracker
        )

        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(dtype=7, string_val=[text.encode()],  # 7: DT_STRING
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        self._event(0, [Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

    def log(self, metrics: dict[str, float], step: int | None) -> None:
        from tensorboard.compat.proto.summary_pb2 import (
            Summary,  # lazy: optional tracker
        )

        if metrics:
            self._event(step, [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()])
            self.writer.flush()

    def finish(self, ok: bool) -> None:
        self.writer.close()


class MlflowTracker:
    """Through MlflowClient, not mlflow's fluent API: a user's own active run is left alone."""

    def __init__(self, recipe, run_dir: Path, config: dict[str, Any], saved: dict[str, Any]):

        from mlflow.entities import Param, RunTag  # lazy: optional tracker
        from mlflow.tracking import MlflowClient  # lazy: optional tracker

        logging.getLogger("alembic").setLevel(logging.WARNING)
        log = recipe.log
        self.uri = mlflow_uri(log)
        self.client = MlflowClient(self.uri)
        run = None
        if saved.get("id") and saved.get("uri") == self.uri:
            try:
                run = self.client.get_run(saved["id"])
                self.client.update_run(run.info.run_id, status="RUNNING")
            except Exception:  # deleted or another store: start a new run
                run = None
        if run is None:
            exp = self.client.get_experiment_by_name(log.project)
            # Artifacts (recipe.toml, hardware.json) beside a local SQLite store, not in whatever folder this runs in.
            where = str(Path(self.uri[len("sqlite:///"):]).parent / "mlruns") if self.uri.startswith("sqlite:///") else None
            exp_id = exp.experiment_id if exp else self.client.create_experiment(log.project, artifact_location=where)
            tags = {"ftkit.run_dir": str(run_dir), **{f"ftkit.tag.{t}": "1" for t in log.tags}}
            if log.group:
                tags["ftkit.group"] = log.group
            run = self.client.create_run(exp_id, run_name=log.run_name or recipe.name, tags=tags)
            params = _flatten({s: config[s] for s in _recipe_sections(recipe)})
            params.update({f"run.{k}": v for k, v in _flatten(config.get("run", {})).items()})
            items = [Param(k[:250], json.dumps(v) if not isinstance(v, str) else v[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # log_batch takes at most 100 params at a time
                self.client.log_batch(run.info.run_id, params=items[i : i + 100])
            self.client.log_batch(run.info.run_id, tags=[RunTag("ftkit.backend", str(config.get("run", {}).get("backend")))])
            self.client.log_text(run.info.run_id, recipe.to_toml(), "recipe.toml")
            self.client.log_dict(run.info.run_id, config.get("hardware", {}), "hardware.json")
        self.run_id = run.info.run_id
        self.state = {"id": self.run_id, "uri": self.uri, "experiment": log.project}

    def log(self, metrics: dict[str, float], step: int | None) -> None:

        from mlflow.entities import Metric  # lazy: optional tracker

        if metrics:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step or 0) for k, v in metrics.items()])

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


TRACKERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}


def _recipe_sections(recipe) -> list[str]:
    return [k for k, v in recipe.to_toml_dict().items() if isinstance(v, dict)]


class Trackers:
    """The recipe's trackers, opened by the run's first "run" record and fed every record after it."""

    def __init__(self, recipe, run_dir: Path):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.open: dict[str, Tracker] = {}
        self._started = False
        self._closed = False

    def log(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "run":
            if not self._started:
                self._start(record)
            return
        if not self._started or self._closed:
            return
        metrics, step = numeric(record), record.get("step")
        for tracker in self.open.values():
            tracker.log(metrics, step)

    def _start(self, run_record: dict[str, Any]) -> None:
        self._started = True
        atexit.register(self._at_exit)  # before the first opens: one failing to start leaves none running
        path = self.run_dir / STATE_FILE
        saved = json.loads(path.read_text()) if path.exists() else {}
        run = {k: v for k, v in run_record.items() if k not in ("kind", "step", "time", "hardware")}
        # The recipe's sections at the top, as W&B sweeps name them: train.lr, method.rank ...
        config = {**self.recipe.to_toml_dict(), "run": run, "hardware": run_record.get("hardware", {})}
        for name in self.recipe.log.report_to:
            try:
                self.open[name] = TRACKERS[name](self.recipe, self.run_dir, config, saved.get(name, {}))
            except FtkitError:
                raise
            except Exception as e:
                raise FtkitError(f"log.report_to {name!r}: could not start the {name} run: {e}") from e

        write_json_atomic(path, {name: t.state for name, t in self.open.items()})

    def close(self, ok: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        for tracker in self.open.values():
            try:
                tracker.finish(ok)
            except Exception:  # a tracker that fails to close must not fail a finished run
                pass

    def _at_exit(self) -> None:
        self.close(ok=False)  # still open at exit: the run ended with an error


def for_recipe(recipe, run_dir: Path) -> Trackers | None:
    return Trackers(recipe, run_dir) if recipe.log.report_to else None
