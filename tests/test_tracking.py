"""Experiment trackers, for real and offline: W&B in offline mode, TensorBoard event files, MLflow's local
store. Each is read back with its own reader and must hold what metrics.jsonl holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from builders import PYTHONPATH, recipe_file
from tracker_files import read_tensorboard, read_wandb

from ftkit.recipe.load import load_recipes
from ftkit.train.metrics import MetricsLog

SENTINEL = "SENTINELwandbkey0123456789abcdef"


def ftkit(args, env, check=True):
    out = subprocess.run([sys.executable, "-m", "ftkit.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def tracker_env(tmp_path):
    return {**os.environ, "PYTHONPATH": PYTHONPATH, "WANDB_API_KEY": SENTINEL,
            "WANDB_DIR": str(tmp_path / "wandb-default"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"}


def test_report_to_validates(tmp_path, tiny_model_dir, small_data):
    r = recipe_file(tmp_path, tiny_model_dir, small_data, "ok", log={"report_to": "tensorboard"})
    (recipe,) = load_recipes([r])
    assert recipe.log.report_to == ["tensorboard"]
    bad = recipe_file(tmp_path, tiny_model_dir, small_data, "bad", log={"report_to": ["wandb", "neptune"]})
    with pytest.raises(Exception, match="report_to"):
        load_recipes([bad])


@pytest.mark.slow
def test_three_trackers_record_the_run_and_resume_into_the_same_runs(tmp_path, tiny_model_dir, small_data):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, "tracked",
                         train={"iters": 6, "steps_per_report": 1, "steps_per_eval": 3, "save_every": 3},
                         log={"report_to": ["wandb", "tensorboard", "mlflow"], "project": "ftkit-test", "tags": ["tiny", "ci"],
                              "wandb_mode": "offline", "mlflow_tracking_uri": uri})
    env = tracker_env(tmp_path)
    # A preempted job: 3 steps, then the rest with --resume auto, into the same tracker runs.
    ftkit(["train", str(recipe), "--backend", "torch", "--stop-after", "3", "--json"], env)
    out = ftkit(["train", str(recipe), "--backend", "torch", "--resume", "auto", "--json"], env)
    result = json.loads(out.stdout)  # wandb's console output kept stdout one JSON object
    run_dir = tmp_path / "run-tracked"
    records = MetricsLog.read(run_dir / "metrics.jsonl")
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    valid = {r["step"]: r["loss"] for r in records if r["kind"] == "valid"}
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and sorted(valid) == [0, 3, 6]
    assert result["last_valid_loss"] == pytest.approx(valid[6])
    state = json.loads((run_dir / "trackers.json").read_text())
    run_record = next(r for r in records if r["kind"] == "run")
    assert run_record["hardware"]["cores_logical"] >= 1 and run_record["hardware"]["packages"]["torch"]

    # W&B: two offline run folders (one per process), one run id, every step once.
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    logs = [read_wandb(f) for f in folders]
    assert {w["run_id"] for w in logs} == {state["wandb"]["id"]}
    assert logs[0]["project"] == "ftkit-test" and logs[0]["name"] == "tracked" and logs[0]["tags"] == ["tiny", "ci"]
    history = [row for w in logs for row in w["history"]]
    wb_train = {row["_step"]: row["train/loss"] for row in history if "train/loss" in row}
    wb_valid = {row["_step"]: row["valid/loss"] for row in history if "valid/loss" in row}
    assert wb_train == pytest.approx({s: r["loss"] for s, r in train.items()})
    assert wb_valid == pytest.approx(valid)
    lr = {row["_step"]: row["train/lr"] for row in history if "train/lr" in row}
    assert lr == pytest.approx({s: r["lr"] for s, r in train.items()})
    assert all("train/tokens_per_sec" in row and "train/grad_norm" in row for row in history if "train/loss" in row)
    config = logs[0]["config"]
    assert config["method"]["rank"] == 4 and config["train"]["lr"] == 3e-3
    assert config["run"]["backend"] == "torch" and config["hardware"]["cores_logical"] >= 1

    # TensorBoard, through its own EventAccumulator.
    tb = read_tensorboard(run_dir / "tensorboard")
    assert dict(tb["scalars"]["train/loss"]) == pytest.approx({s: r["loss"] for s, r in train.items()})
    assert [s for s, _ in tb["scalars"]["train/loss"]] == [1, 2, 3, 4, 5, 6]  # none twice
    assert dict(tb["scalars"]["valid/loss"]) == pytest.approx(valid)
    assert "train/grad_norm" in tb["scalars"] and "train/tokens_per_sec" in tb["scalars"]
    assert "[method]" in tb["text"]["recipe"] and "rank = 4" in tb["text"]["recipe"]
    assert '"backend": "torch"' in tb["text"]["run"]

    # MLflow, through MlflowClient on the local store.
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(state["mlflow"]["id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["method.rank"] == "4" and run.data.params["run.backend"] == "torch"
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in hist} == pytest.approx({s: r["loss"] for s, r in train.items()})
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "valid/loss")} == pytest.approx(valid)
    exp = client.get_experiment_by_name("ftkit-test")
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert "rank = 4" in (mlflow.artifacts.load_text(f"{run.info.artifact_uri}/recipe.toml"))

    # The W&B key came from the environment and was written nowhere.
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and SENTINEL.encode() in p.read_bytes()]
    assert not leaked and SENTINEL not in out.stdout + out.stderr


def test_missing_tracker_is_refused_before_anything_loads(tmp_path, tiny_model_dir, small_data):
    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, "nowandb", log={"report_to": ["wandb"]})
    code = ("import sys; sys.modules['wandb'] = None\n"
            "from ftkit.cli import main; sys.argv = ['ftkit', 'train', sys.argv[1], '--json']; main()\n")
    env = tracker_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    err = json.loads(out.stdout)["error"]
    assert "log.report_to" in err and "ftkit[wandb]" in err
    assert not (tmp_path / "run-nowandb").exists()  # nothing started


class Recorder:
    def __init__(self):
        self.got, self.closed = [], None

    def log(self, record):
        self.got.append((record["kind"], record.get("step")))

    def close(self, ok=True):
        self.closed = ok


def test_resumed_log_does_not_send_steps_twice(tmp_path):
    first = Recorder()
    log = MetricsLog(tmp_path, trackers=first)
    log.log({"step": 0, "kind": "run"})
    for s in range(1, 6):
        log.log({"step": s, "kind": "train", "loss": 1.0 / s})
    log.close()
    assert first.closed is True and len(first.got) == 6
    (tmp_path / "trackers.json").write_text("{}")  # the trackers of this run were started

    again = Recorder()  # a resume from the checkpoint at step 3 re-trains steps 4 and 5, then goes on
    log = MetricsLog(tmp_path, trackers=again)
    log.truncate_after(3)
    log.log({"step": 3, "kind": "run"})
    for s in range(4, 8):
        log.log({"step": s, "kind": "train", "loss": 1.0 / s})
    with pytest.raises(RuntimeError):
        with log:
            raise RuntimeError("crash")
    assert again.got == [("run", 3), ("train", 6), ("train", 7)]
    assert again.closed is False
    assert [r["step"] for r in MetricsLog.read(log.path) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6, 7]


def test_numeric_keeps_numbers_and_nested_task_metrics():
    from ftkit.train.tracking import numeric

    got = numeric({"step": 3, "kind": "valid", "time": 1.0, "loss": 1.25, "accuracy": 0.5, "note": "x", "ok": True,
                   "tasks": {"banking77": {"accuracy": 0.75, "n": 10}}, "bad": float("nan")})
    assert got == {"valid/loss": 1.25, "valid/accuracy": 0.5, "valid/tasks/banking77/accuracy": 0.75, "valid/tasks/banking77/n": 10.0}
