"""Hyperparameter sweeps: `ftkit sweep sweep.toml` runs a base recipe once per point of a search space. The file's keys: ftkit.ops.sweep_spec.

Each trial is `ftkit train` in its own process (a crash or an out-of-memory ends that trial only, and
each gets a clean GPU), on its own recipe file written to its run folder before the first starts,
so every trial's recipe is validated up front.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.table import Table

from ftkit.backend.hardware import detect
from ftkit.common.atomic import write_json_atomic, write_text_atomic
from ftkit.common.errors import FtkitError, RecipeError
from ftkit.ops.sweep_spec import Range, Sweep, load_sweep  # noqa: F401  (callers use sweep.load_sweep)
from ftkit.recipe.load import build_recipe
from ftkit.recipe.schema import Recipe
from ftkit.train.metrics import MetricsLog
from ftkit.train.stages import run_stages
from ftkit.train.tracking import numeric, require

TRIAL_FILE = "trial.json"


TRIAL_RECIPE = "trial.toml"


RESULTS_CSV, RESULTS_JSON = "results.csv", "results.json"


@dataclass
class Trial:
    id: str
    params: dict[str, Any]
    dir: Path
    status: str = "pending"  # pending | done | failed
    metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None
    gpu: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "params": self.params, "status": self.status, "metric": self.metric, "metrics": self.metrics,
                "seconds": self.seconds, "error": self.error, "gpu": self.gpu, "run_dir": str(self.dir)}


def _draw(spec: list[Any] | Range, rng: random.Random) -> Any:
    return spec[rng.randrange(len(spec))] if isinstance(spec, list) else spec.draw(rng)


def points(sweep: Sweep) -> list[dict[str, Any]]:
    """The search space's points, in a fixed order: the grid's product, or the seeded random draw."""
    names = list(sweep.parameters)
    if sweep.method == "grid":
        axes = [[(n, v) for v in spec] for n, spec in sweep.parameters.items()]  # load_sweep: only lists in a grid
        axes += [[tuple((k, group[k][i]) for k in group) for i in range(len(next(iter(group.values()))))] for group in sweep.paired]
        out = []
        for combo in itertools.product(*axes):
            point: dict[str, Any] = {}
            for part in combo:
                if isinstance(part[0], tuple):  # a paired group's position
                    point.update(dict(part))
                else:
                    point[part[0]] = part[1]
            out.append(point)
        return out
    rng = random.Random(sweep.seed)
    out = []
    for _ in range(sweep.trials_n or 0):
        point = {n: _draw(sweep.parameters[n], rng) for n in names}
        for group in sweep.paired:
            i = rng.randrange(len(next(iter(group.values()))))
            point.update({k: v[i] for k, v in group.items()})
        out.append(point)
    return out


def trial_recipe(sweep: Sweep, params: dict[str, Any], run_dir: Path, name: str, extra: dict[str, Any] | None = None):
    """The base recipe with a trial's values, validated like a recipe file (errors name the sweep file)."""

    data = json.loads(json.dumps(sweep.base))
    overridden = set()
    for key, value in {**params, **(extra or {})}.items():
        section, k = key.split(".", 1)
        if not isinstance(data.get(section), dict):
            data[section] = {}
        data[section][k] = value
        overridden.add((section, k))
    data.setdefault("output", {})["dir"] = str(run_dir)
    data["name"] = name
    try:
        return build_recipe(data, sweep.base_where, None, True, overridden)
    except RecipeError as e:
        raise RecipeError([f"sweep {sweep.file}, trial {name} ({_describe(params)}): {p}" for p in e.problems]) from None


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_metrics(run_dir: Path, summary: str = "last", goal: str = "minimize") -> dict[str, float]:
    """`<kind>.<key>` -> the last (or best) value of every number the run's metrics.jsonl records
    (nested ones as valid.tasks.<task>.<metric>)."""

    path = Path(run_dir) / "metrics.jsonl"
    series: dict[str, list[float]] = {}
    for r in MetricsLog.read(path) if path.exists() else []:
        if r.get("kind") == "run":
            continue
        for key, value in numeric(r).items():
            series.setdefault(key.replace("/", "."), []).append(value)
    pick = (min if goal == "minimize" else max) if summary == "best" else (lambda xs: xs[-1])
    return {k: pick(v) for k, v in series.items()}


def _gpu_pool(sweep: Sweep) -> list[str] | None:
    if sweep.gpus is not None:
        return sweep.gpus
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g.strip() for g in visible.split(",") if g.strip()]

    count = detect()["cuda"]["count"]
    return [str(i) for i in range(count)] or None


def _read_trial(d: Path) -> dict[str, Any] | None:
    p = d / TRIAL_FILE
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except json.JSONDecodeError:
        return None


def _write_trial(t: Trial) -> None:

    write_json_atomic(t.dir / TRIAL_FILE, t.as_dict())


def plan(sweep: Sweep, resume: bool) -> list[Trial]:
    """Every trial with its recipe written (all validated before any runs); finished ones marked done."""

    pts = points(sweep)
    width = max(3, len(str(len(pts) - 1)))
    trials = []
    existing = sorted(sweep.output_dir.glob("trial-*")) if sweep.output_dir.is_dir() else []
    if existing and not resume:
        raise FtkitError(f"{sweep.output_dir} already holds a sweep ({len(existing)} trial folders). Pass --resume to run the "
                         "trials that have not finished, or set sweep.output_dir (--out) for a new one; nothing was overwritten.")
    recipes, problems = [], []
    for i, params in enumerate(pts):
        tid = f"trial-{i:0{width}d}"
        d = sweep.output_dir / tid
        t = Trial(tid, params, d)
        old = _read_trial(d)
        if old is not None and json.loads(json.dumps(params)) != old.get("params"):
            raise FtkitError(f"{d} was run with {_describe(old.get('params', {}))}, but the sweep now gives it {_describe(params)}: "
                             "the search space changed. Use a new sweep.output_dir (--out).")
        if old is not None and old.get("status") == "done":
            t.status, t.metric, t.metrics, t.seconds = "done", old.get("metric"), old.get("metrics", {}), old.get("seconds")
        extra = {}
        base_log = sweep.base.get("log", {}) if isinstance(sweep.base.get("log"), dict) else {}
        if base_log.get("report_to"):
            extra = {"log.group": base_log.get("group") or sweep.name}
        try:
            recipes.append((t, trial_recipe(sweep, params, d, f"{sweep.name}-{tid}", extra)))
        except RecipeError as e:
            problems += e.problems
        trials.append(t)
    if problems:  # every trial's, before any trial runs
        raise RecipeError(problems)

    require([recipes[0][1]] if recipes else [])
    for t, recipe in recipes:
        if t.status != "done":
            write_text_atomic(t.dir / TRIAL_RECIPE, recipe.to_toml())
    return trials


def _run_one(sweep: Sweep, t: Trial, gpu: str | None, backend: str, say: Callable[[str], None]) -> None:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu  # the trial sees one GPU, as cuda:0
    t.gpu, t.status, t.error = gpu, "running", None
    _write_trial(t)
    cmd = [sys.executable, "-m", "ftkit.cli", "train", str(t.dir / TRIAL_RECIPE), "--backend", backend, "--resume", "auto", "--json"]
    start = time.perf_counter()
    with open(t.dir / "train.log", "a", encoding="utf-8") as log:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    t.seconds = round(time.perf_counter() - start, 2)
    result: dict[str, Any] = {}
    lines = done.stdout.strip().splitlines()
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = {}
    if done.returncode != 0:
        t.status = "failed"
        t.error = result.get("error") or f"exit code {done.returncode}; see {t.dir / 'train.log'}"
    else:
        t.metrics = run_metrics(t.dir, sweep.summary, sweep.goal)
        t.metric = t.metrics.get(sweep.metric)
        t.status = "done"
        if t.metric is None:
            t.status = "failed"
            t.error = (f"the run recorded no {sweep.metric} (it has: {', '.join(sorted(t.metrics)) or 'nothing'}); "
                       "set sweep.metric to one of those")
    _write_trial(t)
    if t.status == "done":
        say(f"{t.id} ({_describe(t.params)}): {sweep.metric} {t.metric:.4f} in {t.seconds:.0f} s")
    else:
        say(f"[red]{t.id} ({_describe(t.params)}) failed:[/] {t.error}")


def run(sweep: Sweep, resume: bool = False, say: Callable[[str], None] = lambda _m: None) -> list[Trial]:
    """Run the sweep's unfinished trials (`parallel` at a time, each pinned to a GPU when there are
    GPUs) and write the results table; returns every trial, best first."""
    trials = plan(sweep, resume)
    todo = [t for t in trials if t.status != "done"]
    skipped = len(trials) - len(todo)
    say(f"sweep {sweep.name}: {len(trials)} trials ({sweep.method}), {len(todo)} to run"
        + (f", {skipped} finished earlier" if skipped else "") + f"; results in {sweep.output_dir}")
    pool = _gpu_pool(sweep) if sweep.parallel > 1 or sweep.gpus is not None else None
    width = min(sweep.parallel, len(pool)) if pool else sweep.parallel
    free = list(pool) if pool else []
    lock = threading.Lock()
    queue = list(todo)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                t = queue.pop(0)
                gpu = free.pop(0) if free else None
            try:
                _run_one(sweep, t, gpu, sweep.backend, say)
            finally:
                with lock:
                    if gpu is not None:
                        free.append(gpu)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(width, len(todo))))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ranked = rank(sweep, trials)
    write_results(sweep, ranked)
    return ranked


def rank(sweep: Sweep, trials: list[Trial]) -> list[Trial]:
    sign = 1 if sweep.goal == "minimize" else -1
    return sorted(trials, key=lambda t: (t.metric is None, sign * (t.metric if t.metric is not None else 0.0), t.id))


def write_results(sweep: Sweep, ranked: list[Trial]) -> None:

    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(k for t in ranked for k in t.params))
    payload = {"sweep": str(sweep.file), "metric": sweep.metric, "goal": sweep.goal, "summary": sweep.summary,
               "best": ranked[0].as_dict() if ranked and ranked[0].metric is not None else None,
               "trials": [t.as_dict() for t in ranked]}
    write_text_atomic(sweep.output_dir / RESULTS_JSON, json.dumps(payload, indent=2) + "\n")

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "trial", *names, sweep.metric, "status", "seconds", "run_dir"])
    for i, t in enumerate(ranked, 1):
        w.writerow([i, t.id, *[t.params.get(n, "") for n in names], "" if t.metric is None else t.metric, t.status,
                    "" if t.seconds is None else t.seconds, str(t.dir)])
    write_text_atomic(sweep.output_dir / RESULTS_CSV, buf.getvalue())


def results_table(sweep: Sweep, ranked: list[Trial]):

    names = list(dict.fromkeys(k for t in ranked for k in t.params))
    arrow = "lower" if sweep.goal == "minimize" else "higher"
    table = Table(title=f"sweep {sweep.name}: {sweep.metric} ({sweep.summary}, {arrow} is better), best first")
    for col in ["#", "trial", *names, sweep.metric, "status", "s"]:
        table.add_column(col, justify="right" if col not in ("trial", "status") else "left")
    for i, t in enumerate(ranked, 1):
        table.add_row(str(i), t.id, *[_fmt(t.params.get(n, "")) for n in names],
                      "-" if t.metric is None else f"{t.metric:.4f}", t.status, "-" if t.seconds is None else f"{t.seconds:.0f}")
    return table


def agent_params(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe keys in a W&B run's config: "train.lr" = 1e-3, or nested {"train": {"lr": 1e-3}}."""

    sections = set(Recipe.model_fields) - {"name"}
    out = {}
    for key, value in config.items():
        if "." in key and key.split(".", 1)[0] in sections:
            out[key] = value
        elif key in sections and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
    return out


def agent_trial(sweep: Sweep) -> dict[str, Any]:
    """One W&B sweep trial, in the agent's process: the agent's run gives the values, ftkit trains and
    logs into that run. This is the function `ftkit sweep --wandb-agent` hands to `wandb.agent`."""
    import wandb  # lazy: optional tracker

    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(dir=str(sweep.output_dir))  # under the agent, its run: id and config come from the sweep
    ok = False
    try:
        params = agent_params(dict(run.config))
        log = sweep.base.get("log", {}) if isinstance(sweep.base.get("log"), dict) else {}
        report_to = list(dict.fromkeys([*(log.get("report_to") or []), "wandb"]))
        run_dir = sweep.output_dir / run.id
        recipe = trial_recipe(sweep, params, run_dir, f"{sweep.name}-{run.id}", {"log.report_to": report_to})
        require([recipe])
        (result,) = run_stages([recipe], sweep.backend, resume="auto", quiet=True)
        metrics = run_metrics(run_dir, sweep.summary, sweep.goal)
        run.summary.update({f"ftkit/{k}": v for k, v in metrics.items()})
        t = Trial(run.id, params, run_dir, "done", metrics.get(sweep.metric), metrics, round(result.seconds, 2))
        _write_trial(t)
        ok = True
        return t.as_dict()
    finally:
        run.finish(exit_code=0 if ok else 1)


def run_wandb_agent(sweep: Sweep, sweep_id: str, count: int | None) -> None:
    import wandb  # lazy: optional tracker

    try:
        wandb.agent(sweep_id, function=lambda: agent_trial(sweep), count=count)
    except Exception as e:  # no network, unknown sweep, not logged in: one sentence, not a traceback
        raise FtkitError(f"wandb agent {sweep_id}: {e}") from e
