"""ftkit sweep: grid, random and paired search spaces, trials in their own processes and run folders,
a ranked results table, --resume, and W&B's agent driving ftkit (offline, as far as wandb allows)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import tomllib
from builders import PYTHONPATH, REPO, recipe_file

from ftkit.common.errors import FtkitError, RecipeError
from ftkit.ops import sweep as sweeps
from ftkit.recipe.load import load_recipes


def env(tmp_path):
    return {**os.environ, "PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "WANDB_DIR": str(tmp_path / "wandb-default"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_SILENT": "true", "COLUMNS": "200"}


def sweep_file(tmp_path, base, body):
    p = tmp_path / "lr.toml"
    p.write_text(f'[sweep]\nrecipe = "{base.name}"\n' + body)
    return p


def test_grid_random_and_paired_points(tmp_path, tiny_model_dir, small_data):
    base = recipe_file(tmp_path, tiny_model_dir, small_data, "base")
    grid = sweeps.load_sweep(sweep_file(tmp_path, base, (
        '[sweep.parameters]\n"train.lr" = [1e-3, 3e-3]\n[sweep.parameters.train]\nwarmup = [0, 2]\n'
        '[[sweep.paired]]\n"method.rank" = [2, 4, 8]\n"method.alpha" = [4, 8, 16]\n')))
    pts = sweeps.points(grid)
    assert len(pts) == 2 * 2 * 3
    assert {(p["method.rank"], p["method.alpha"]) for p in pts} == {(2, 4), (4, 8), (8, 16)}  # paired: together
    assert pts[0] == {"train.lr": 1e-3, "train.warmup": 0, "method.rank": 2, "method.alpha": 4}

    rnd = sweeps.load_sweep(sweep_file(tmp_path, base, (
        'method = "random"\ntrials = 20\nseed = 7\n[sweep.parameters]\n'
        '"train.lr" = { min = 1e-5, max = 1e-2, distribution = "log_uniform" }\n"train.batch_size" = [2, 4]\n'
        '"method.rank" = { min = 2, max = 6, distribution = "int_uniform" }\n')))
    a, b = sweeps.points(rnd), sweeps.points(rnd)
    assert a == b and len(a) == 20  # seeded
    assert all(1e-5 <= p["train.lr"] <= 1e-2 and p["train.batch_size"] in (2, 4) and 2 <= p["method.rank"] <= 6 for p in a)
    assert len({p["train.lr"] for p in a}) == 20 and isinstance(a[0]["method.rank"], int)


@pytest.mark.parametrize("body, message", [
    ('[sweep.parameters]\n"train.lr" = { min = 1e-4, max = 1e-3 }\n', "a grid needs a list of values"),
    ('method = "random"\n[sweep.parameters]\n"train.lr" = [1e-3]\n', "needs sweep.trials"),
    ('[[sweep.paired]]\n"method.rank" = [2, 4]\n"method.alpha" = [4]\n', "all of one length"),
    ('metric = "loss"\n[sweep.parameters]\n"train.lr" = [1e-3]\n', "KIND.KEY"),
    ('[sweep.parameters]\n"lr" = [1e-3]\n', "SECTION.KEY"),
    ('trails = 8\n[sweep.parameters]\n"train.lr" = [1e-3]\n', r"unknown key sweep\.trails\. Did you mean 'trials'\?"),
    ('method = "random"\ntrials = 2\n[sweep.parameters]\n"train.lr" = { min = 1e-4, max = 1e-3, distrbution = "log_uniform" }\n',
     r"sweep\.parameters\.\"train\.lr\"\.distrbution\. Did you mean 'distribution'\?"),
    ('method = "random"\ntrials = 2\n[sweep.parameters]\n"train.lr" = { min = 0.0, max = 1e-3, distribution = "log_uniform" }\n',
     "log_uniform needs min > 0"),
    ('method = "random"\ntrials = 2\n[sweep.parameters]\n"train.lr" = { min = 1e-3, max = 1e-4 }\n', "needs min <= max"),
    ('method = "random"\ntrials = 2\n[sweep.parameters]\n"train.lr" = { min = 0, max = 1, distribution = "normal" }\n',
     r"distribution: Input should be 'uniform', 'log_uniform' or 'int_uniform' \(got 'normal'\)"),
    ('[sweep.parameters]\n"train.lr" = 1e-3\n', r"\"train\.lr\": give a list of values"),
    ('[sweep.parameters]\n"train.lr" = []\n', r"\"train\.lr\": List should have at least 1 item"),
    ('goal = "min"\n[sweep.parameters]\n"train.lr" = [1e-3]\n', r"sweep\.goal: Input should be 'minimize' or 'maximize'"),
    ('method = "bayes"\n[sweep.parameters]\n"train.lr" = [1e-3]\n', "--wandb-agent"),
    ('trials = "8"\nmethod = "random"\n[sweep.parameters]\n"train.lr" = [1e-3]\n', r"sweep\.trials: Input should be a valid integer"),
    ('[sweep.parameters]\n"train.lr" = [1e-3]\n[[sweep.paired]]\n"train.lr" = [1e-3]\n', "both in sweep.parameters and in sweep.paired"),
    ('[sweep.parameters]\n', "no parameters"),
])
def test_bad_sweep_files_are_refused(tmp_path, tiny_model_dir, small_data, body, message):
    base = recipe_file(tmp_path, tiny_model_dir, small_data, "base")
    path = sweep_file(tmp_path, base, body)
    with pytest.raises(RecipeError, match=message) as e:
        sweeps.load_sweep(path)
    assert all(p.startswith(str(path)) for p in e.value.problems)  # each problem names the sweep file


def test_every_problem_of_a_sweep_file_is_reported_at_once(tmp_path, tiny_model_dir, small_data):
    base = recipe_file(tmp_path, tiny_model_dir, small_data, "base")
    path = sweep_file(tmp_path, base, 'summary = "mean"\nparallel = 0\n[sweep.parameters]\nlr = [1]\n"train.warmup" = 3\n')
    with pytest.raises(RecipeError) as e:
        sweeps.load_sweep(path, {"backend": "tpu"})
    keys = ["sweep.summary", "sweep.parallel", "sweep.parameters.lr", 'sweep.parameters."train.warmup"', "sweep.backend"]
    assert len(e.value.problems) == len(keys) and all(any(k in p for p in e.value.problems) for k in keys), e.value.problems
    assert any("(--backend)" in p for p in e.value.problems)  # a value from the command line says so


def test_sweep_settings_and_their_defaults(tmp_path, tiny_model_dir, small_data):
    base = recipe_file(tmp_path, tiny_model_dir, small_data, "base")
    spec = sweeps.load_sweep(sweep_file(tmp_path, base, '[sweep.parameters]\n"train.lr" = { values = [1e-3, 2e-3] }\n'))
    assert (spec.method, spec.metric, spec.goal, spec.summary, spec.parallel, spec.backend, spec.gpus, spec.seed) == (
        "grid", "valid.loss", "minimize", "last", 1, "auto", None, 0)
    assert spec.parameters == {"train.lr": [1e-3, 2e-3]} and spec.output_dir == (Path.cwd() / "runs" / "lr").resolve()
    one = sweeps.load_sweep(sweep_file(tmp_path, base, 'gpus = "0, 2"\noutput_dir = "out"\n[sweep.paired]\n"method.rank" = [2, 4]\n'
                                                       '"method.alpha" = [4, 8]\n'))
    assert one.gpus == ["0", "2"] and one.output_dir == (tmp_path / "out").resolve()  # relative to the sweep file
    assert one.paired == [{"method.rank": [2, 4], "method.alpha": [4, 8]}]  # one [sweep.paired] table is one group


def test_a_bad_trial_value_is_refused_before_any_trial_runs(tmp_path, tiny_model_dir, small_data):
    base = recipe_file(tmp_path, tiny_model_dir, small_data, "base")
    spec = sweeps.load_sweep(sweep_file(tmp_path, base, '[sweep.parameters]\n"train.lr" = [1e-3, -1.0]\n"train.sceduler" = ["linear"]\n'),
                             {"output_dir": str(tmp_path / "bad")})
    with pytest.raises(RecipeError) as e:
        sweeps.run(spec)
    text = str(e.value)
    assert "trial-001" in text and "train.lr" in text and "Did you mean 'scheduler'" in text
    assert not list(spec.output_dir.glob("trial-*/trial.toml"))


@pytest.mark.slow
def test_sweep_runs_ranks_and_resumes(tmp_path, tiny_model_dir, small_data):
    base = recipe_file(tmp_path, tiny_model_dir, small_data, "base",
                       train={"iters": 3, "steps_per_eval": 3, "save_every": 3, "val_batches": 1})
    sf = sweep_file(tmp_path, base, ('parallel = 2\n[sweep.parameters]\n"train.lr" = [1e-2]\n'
                                     '[[sweep.paired]]\n"method.rank" = [2, 4]\n"method.alpha" = [4, 8]\n'))
    out = tmp_path / "sweep-out"
    cli = [sys.executable, "-m", "ftkit.cli", "sweep", str(sf), "--out", str(out), "--backend", "torch"]
    done = subprocess.run(cli + ["--json"], capture_output=True, text=True, env=env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout)
    trials = result["trials"]
    assert len(trials) == 2 and all(t["status"] == "done" for t in trials)
    losses = [t["metric"] for t in trials]
    assert losses == sorted(losses)  # best first
    assert result["best"]["id"] == trials[0]["id"]
    for t in trials:  # each trial trained with its own values, in its own run folder
        (recipe,) = load_recipes([tmp_path / "sweep-out" / t["id"] / "recipe.toml"])
        assert recipe.train.lr == t["params"]["train.lr"] == 1e-2 and recipe.method.rank == t["params"]["method.rank"]
        assert recipe.method.alpha == 2 * recipe.method.rank
        last_valid = [json.loads(line) for line in (out / t["id"] / "metrics.jsonl").read_text().splitlines()
                      if '"valid"' in line][-1]
        assert t["metric"] == pytest.approx(last_valid["loss"])
        assert (out / t["id"] / "adapter" / "adapter_model.safetensors").exists()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["trial"] for r in rows] == [t["id"] for t in trials] and float(rows[0]["valid.loss"]) == pytest.approx(losses[0])

    # Without --resume the finished sweep is not overwritten; with it, only the unfinished trial runs.
    again = subprocess.run(cli, capture_output=True, text=True, env=env(tmp_path), timeout=600)
    assert again.returncode == 2 and "--resume" in again.stdout + again.stderr
    redo = out / trials[-1]["id"]
    record = json.loads((redo / "trial.json").read_text())
    (redo / "trial.json").write_text(json.dumps({**record, "status": "failed"}))
    before = {t["id"]: (out / t["id"] / "metrics.jsonl").stat().st_mtime_ns for t in trials}
    resumed = subprocess.run(cli + ["--resume"], capture_output=True, text=True, env=env(tmp_path), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "1 to run, 1 finished earlier" in resumed.stderr and "best first" in resumed.stderr  # progress on stderr
    after = {t["id"]: (out / t["id"] / "metrics.jsonl").stat().st_mtime_ns for t in trials}
    assert [i for i in before if before[i] != after[i]] == []  # the run folder was complete: --resume auto only reported
    assert json.loads((redo / "trial.json").read_text())["status"] == "done"


def test_trials_are_pinned_one_gpu_each(tmp_path, tiny_model_dir, small_data, monkeypatch):
    base = recipe_file(tmp_path, tiny_model_dir, small_data, "base")
    spec = sweeps.load_sweep(sweep_file(tmp_path, base, 'parallel = 2\ngpus = [3, 5]\n[sweep.parameters]\n"train.lr" = [1e-3, 2e-3, 3e-3, 4e-3]\n'),
                             {"output_dir": str(tmp_path / "pinned")})
    seen = []

    def fake_run(sweep, t, gpu, backend, say):  # what each trial's process would see as CUDA_VISIBLE_DEVICES
        seen.append((t.id, gpu))
        t.status, t.metric = "done", -float(t.params["train.lr"])  # the largest lr wins: ranking reverses the order

    monkeypatch.setattr(sweeps, "_run_one", fake_run)
    ranked = sweeps.run(spec)
    assert {g for _, g in seen} == {"3", "5"} and len(seen) == 4
    assert [t.params["train.lr"] for t in ranked] == [4e-3, 3e-3, 2e-3, 1e-3]
    rows = (tmp_path / "pinned" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("rank,trial,train.lr,valid.loss") and rows[1].startswith("1,trial-003,0.004")


def test_wandb_agent_function_trains_with_the_sweeps_values(tmp_path, tiny_model_dir, small_data):
    """What `wandb.agent` does for each trial, minus its server: it writes the trial's values with wandb's
    own config writer, sets WANDB_SWEEP_ID / WANDB_RUN_ID / WANDB_SWEEP_PARAM_PATH, and calls ftkit's function,
    whose wandb.init() (offline here) picks them up."""
    pytest.importorskip("wandb")
    base = recipe_file(tmp_path, tiny_model_dir, small_data, "base", train={"iters": 2, "steps_per_eval": 2, "save_every": 2})
    sf = sweep_file(tmp_path, base, f'output_dir = "{tmp_path / "agent"}"\n')
    params = tmp_path / "sweep-abc" / "config-run42.yaml"
    code = (
        "import json, os, sys\n"
        "from wandb.sdk.lib import config_util\n"
        f"config_util.save_config_file_from_dict({str(params)!r}, {{'train.lr': {{'value': 0.005}}, 'method': {{'value': {{'rank': 2}}}}}})\n"
        f"os.environ.update(WANDB_MODE='offline', WANDB_SWEEP_ID='abc', WANDB_RUN_ID='run42', WANDB_SWEEP_PARAM_PATH={str(params)!r})\n"
        "from ftkit.ops import sweep\n"
        "spec = sweep.load_sweep(sys.argv[1], need_space=False); spec.backend = 'torch'\n"
        "print(json.dumps(sweep.agent_trial(spec)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(sf)], capture_output=True, text=True, env=env(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    trial = json.loads(out.stdout.strip().splitlines()[-1])
    assert trial["id"] == "run42" and trial["params"] == {"train.lr": 0.005, "method.rank": 2}
    (recipe,) = load_recipes([tmp_path / "agent" / "run42" / "recipe.toml"])
    assert recipe.train.lr == 0.005 and recipe.method.rank == 2 and "wandb" in recipe.log.report_to
    from tracker_files import read_wandb

    (folder,) = (tmp_path / "agent" / "wandb").glob("offline-run-*")
    logged = read_wandb(folder)
    assert logged["run_id"] == "run42" and logged["config"]["train.lr"] == 0.005
    assert logged["config"]["train"]["lr"] == 0.005  # ftkit's resolved recipe, in the same run
    assert [row["valid/loss"] for row in logged["history"] if "valid/loss" in row] == pytest.approx(
        [r["loss"] for r in map(json.loads, (tmp_path / "agent" / "run42" / "metrics.jsonl").read_text().splitlines())
         if r["kind"] == "valid"])


def test_sweep_without_a_base_is_an_error(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('[sweep]\nrecipe = "missing.toml"\n')
    with pytest.raises(FtkitError, match="missing.toml"):
        sweeps.load_sweep(p)


def test_the_ready_sweep_file_loads():
    spec = sweeps.load_sweep(REPO / "recipes" / "sweeps" / "quickstart-lr.toml")
    pts = sweeps.points(spec)
    assert len(pts) == 6 and {(p["method.rank"], p["method.alpha"]) for p in pts} == {(8, 16), (16, 32)}
    assert spec.base["train"]["iters"] == 20 and spec.base["model"]["path"].endswith("models/SmolLM2-135M-Instruct")
    assert spec.output_dir.name == "quickstart-lr"


def test_run_metrics_last_or_best_and_nested_task_metrics(tmp_path):
    from ftkit.train.metrics import MetricsLog

    with MetricsLog(tmp_path) as log:
        for s, (loss, f1) in enumerate([(2.0, 0.2), (1.0, 0.6), (1.5, 0.5)], 1):
            log.log({"step": s, "kind": "valid", "loss": loss, "tasks": {"sst2": {"f1": f1}}})
    last = sweeps.run_metrics(tmp_path)
    assert last["valid.loss"] == 1.5 and last["valid.tasks.sst2.f1"] == 0.5
    assert sweeps.run_metrics(tmp_path, "best", "minimize")["valid.loss"] == 1.0
    assert sweeps.run_metrics(tmp_path, "best", "maximize")["valid.tasks.sst2.f1"] == 0.6


@pytest.mark.slow
def test_a_sweep_over_a_recipe_with_an_emoji_runs_and_reports(tmp_path, tiny_model_dir, small_data):
    """A character outside the Basic Multilingual Plane in a template: every file ftkit writes is TOML that
    tomllib reads back (no surrogate escapes), so each trial loads and trains and `ftkit report` reads the run."""
    template = "🙂 {text}"
    recipe = tomllib.loads(recipe_file(tmp_path, tiny_model_dir, small_data, "plain",
                                       train={"iters": 2, "steps_per_eval": 2, "save_every": 2, "val_batches": 1}).read_text())
    recipe["data"]["text_template"] = template
    base = tmp_path / "base.toml"  # tomli_w, not builders.recipe_file: its json.dumps writes the emoji as surrogates
    base.write_text(tomli_w.dumps(recipe), encoding="utf-8")
    sf = sweep_file(tmp_path, base, '[sweep.parameters]\n"train.lr" = [1e-3, 1e-2]\n')
    out = tmp_path / "emoji-sweep"
    done = subprocess.run([sys.executable, "-m", "ftkit.cli", "sweep", str(sf), "--out", str(out), "--backend", "torch", "--json"],
                          capture_output=True, text=True, env=env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    trials = json.loads(done.stdout)["trials"]
    assert len(trials) == 2 and all(t["status"] == "done" for t in trials), trials
    for t in trials:
        for name in ("trial.toml", "recipe.toml"):  # what the sweep wrote, and what the trial's run wrote
            text = (out / t["id"] / name).read_text(encoding="utf-8")
            assert "\\ud83d" not in text.lower()
            assert tomllib.loads(text)["data"]["text_template"] == template
    run_dir = out / trials[0]["id"]
    report = subprocess.run([sys.executable, "-m", "ftkit.cli", "report", str(run_dir), "--json"],
                            capture_output=True, text=True, env=env(tmp_path), timeout=300)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    page = Path(json.loads(report.stdout)["report"]).read_text(encoding="utf-8")
    assert template in page and trials[0]["id"] in page  # the recipe shown, and its name read from it
