"""Hyperparameter sweeps: `ftkit sweep sweep.toml` runs a base recipe once per point of a search space.

```toml
[sweep]
recipe = "quickstart.toml"    # the base recipe (or put its sections in this file)
method = "grid"               # grid | random
trials = 8                    # random: how many points
seed = 0                      # random: the draw
metric = "valid.loss"         # <kind>.<key> of the run's metrics.jsonl: valid.loss, train.loss, valid.<task metric>
goal = "minimize"             # or maximize
summary = "last"              # last | best: the metric's last value in each run, or its best
parallel = 1                  # trials at a time; on a machine with GPUs each trial is pinned to one
output_dir = "runs/lr-sweep"  # trial-000/, trial-001/ ... (each a run folder) and results.csv / results.json

[sweep.parameters]
"train.lr" = [1e-4, 3e-4, 1e-3]                               # values (grid or random)
"train.warmup" = { min = 0.0, max = 0.1 }                      # random only: uniform, log_uniform or int_uniform
[[sweep.paired]]                                               # values that vary together, position by position
"method.rank" = [4, 8, 16]
"method.alpha" = [8, 16, 32]
```

Each trial is `ftkit train` in its own process (a crash or an out-of-memory ends that trial only, and
each gets a clean GPU), on its own recipe file written to its run folder before the first starts,
so every trial's recipe is validated up front.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tomllib

from ftkit.backend.hardware import detect
from ftkit.common.atomic import write_json_atomic, write_text_atomic
from ftkit.common.errors import FtkitError, RecipeError
from ftkit.recipe.load import _resolve_paths, build_recipe
from ftkit.recipe.schema import Recipe
from ftkit.train.metrics import MetricsLog
from ftkit.train.stages import run_stages
from ftkit.train.tracking import numeric, require

TRIAL_FILE = "trial.json"


TRIAL_RECIPE = "trial.toml"


RESULTS_CSV, RESULTS_JSON = "results.csv", "results.json"


DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")


SWEEP_KEYS = {"recipe", "method", "trials", "seed", "metric", "goal", "summary", "parallel", "gpus", "output_dir", "backend",
              "parameters", "paired"}


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


@dataclass
class Sweep:
    name: str
    file: Path
    base: dict[str, Any]      # the base recipe's data, paths resolved
    base_where: str
    method: str
    parameters: dict[str, Any]
    paired: list[dict[str, list[Any]]]
    trials_n: int | None
    seed: int
    metric: str
    goal: str
    summary: str
    parallel: int
    gpus: list[str] | None
    output_dir: Path
    backend: str

    def better(self, a: float, b: float) -> bool:
        return a < b if self.goal == "minimize" else a > b


def _flatten_params(table: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """`"train.lr" = [...]` or `[sweep.parameters.train] lr = [...]`, both as {"train.lr": spec}."""
    out = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not ({"min", "max", "values"} & set(value)):
            out.update(_flatten_params(value, where, f"{name}."))
        else:
            out[name] = value
    return out


def _check_param(name: str, spec: Any, method: str, where: str) -> list[str]:
    if "." not in name:
        return [f"{where}: sweep parameter {name!r}: name a recipe key as SECTION.KEY, e.g. \"train.lr\"."]
    if isinstance(spec, list):
        return [] if spec else [f"{where}: sweep parameter {name}: the list of values is empty."]
    if isinstance(spec, dict):
        if "values" in spec:
            return _check_param(name, spec["values"], method, where)
        dist = spec.get("distribution", "uniform")
        problems = []
        if method == "grid":
            problems.append(f"{where}: sweep parameter {name}: a grid needs a list of values; min/max ranges are for method = \"random\".")
        if dist not in DISTRIBUTIONS:
            problems.append(f"{where}: sweep parameter {name}: distribution {dist!r}; choose one of {', '.join(DISTRIBUTIONS)}.")
        if not all(isinstance(spec.get(k), (int, float)) for k in ("min", "max")) or spec["min"] > spec["max"]:
            problems.append(f"{where}: sweep parameter {name}: needs numbers min <= max (got {spec}).")
        elif dist == "log_uniform" and spec["min"] <= 0:
            problems.append(f"{where}: sweep parameter {name}: log_uniform needs min > 0.")
        extra = set(spec) - {"min", "max", "distribution"}
        if extra:
            problems.append(f"{where}: sweep parameter {name}: unknown keys {sorted(extra)} (min, max, distribution, or values).")
        return problems
    return [f"{where}: sweep parameter {name}: give a list of values or a {{ min, max }} range (got {spec!r})."]


def load_sweep(path: Path, overrides: dict[str, Any] | None = None, need_space: bool = True) -> Sweep:
    """The sweep file, checked whole. `need_space` False: a W&B sweep gives the values (--wandb-agent)."""

    path = Path(path)
    if not path.is_file():
        raise FtkitError(f"{path}: no such sweep file.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FtkitError(f"{path}: not valid TOML: {e}") from None
    s = {**data.pop("sweep", {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    where = str(path)
    problems = [f"{where}: unknown key sweep.{k}." for k in s if k not in SWEEP_KEYS]
    base_where = where
    if "recipe" in s:
        base_file = (path.parent / s["recipe"]).resolve()
        if not base_file.is_file():
            raise FtkitError(f"{where}: sweep.recipe: {base_file} does not exist.")
        base = tomllib.loads(base_file.read_text())
        _resolve_paths(base, base_file.parent)
        inline = {k: v for k, v in data.items()}
        _resolve_paths(inline, path.parent.resolve())
        for section, values in inline.items():  # sections in the sweep file override the base recipe's
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section].update(values)
            else:
                base[section] = values
        base.setdefault("name", base_file.stem)
        base_where = str(base_file)
    else:
        base = data
        _resolve_paths(base, path.parent.resolve())
        base.setdefault("name", path.stem)
    method = s.get("method", "grid")
    if method not in ("grid", "random"):
        problems.append(f"{where}: sweep.method = {method!r}; choose \"grid\" or \"random\" (W&B's bayes: ftkit sweep --wandb-agent).")
    params = _flatten_params(s.get("parameters", {}), where)
    for name, spec in params.items():
        problems += _check_param(name, spec, method, where)
    paired = s.get("paired", [])
    if isinstance(paired, dict):
        paired = [paired]
    for i, group in enumerate(paired):
        group = _flatten_params(group, where)
        paired[i] = group
        lengths = {len(v) if isinstance(v, list) else -1 for v in group.values()}
        if -1 in lengths or len(lengths) != 1 or 0 in lengths:
            problems.append(f"{where}: sweep.paired group {i + 1}: every key needs a list of values, all of one length "
                            f"(got {', '.join(f'{k}: {len(v) if isinstance(v, list) else v!r}' for k, v in group.items())}).")
        for name in group:
            if "." not in name:
                problems.append(f"{where}: sweep.paired key {name!r}: name a recipe key as SECTION.KEY.")
            if name in params:
                problems.append(f"{where}: {name} is both in sweep.parameters and in sweep.paired; keep one.")
    if not params and not paired and need_space:
        problems.append(f"{where}: the sweep has no parameters: add [sweep.parameters] (or [[sweep.paired]]).")
    trials_n = s.get("trials")
    if method == "random" and not (isinstance(trials_n, int) and trials_n >= 1):
        problems.append(f"{where}: method = \"random\" needs sweep.trials, the number of points to draw (e.g. trials = 8).")
    goal = s.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        problems.append(f"{where}: sweep.goal = {goal!r}; choose \"minimize\" or \"maximize\".")
    summary = s.get("summary", "last")
    if summary not in ("last", "best"):
        problems.append(f"{where}: sweep.summary = {summary!r}; choose \"last\" or \"best\".")
    metric = s.get("metric", "valid.loss")
    if not isinstance(metric, str) or "." not in metric:
        problems.append(f"{where}: sweep.metric = {metric!r}; name it KIND.KEY, e.g. \"valid.loss\".")
    parallel = s.get("parallel", 1)
    if not (isinstance(parallel, int) and parallel >= 1):
        problems.append(f"{where}: sweep.parallel = {parallel!r}; a count of trials at a time, 1 or more.")
    gpus = s.get("gpus")
    if gpus is not None:
        gpus = [str(g) for g in (gpus if isinstance(gpus, list) else str(gpus).split(","))]
    if problems:
        raise RecipeError(problems)
    name = path.stem
    out = Path(s["output_dir"]) if "output_dir" in s else Path("runs") / name
    if "output_dir" in s and not out.is_absolute() and "output_dir" not in (overrides or {}):
        out = path.parent / out
    return Sweep(name=name, file=path, base=base, base_where=base_where, method=method, parameters=params, paired=paired,
                 trials_n=trials_n, seed=int(s.get("seed", 0)), metric=metric, goal=goal, summary=summary, parallel=parallel,
                 gpus=gpus, output_dir=out.resolve(), backend=s.get("backend", "auto"))


def _draw(spec: Any, rng: random.Random) -> Any:
    if isinstance(spec, dict) and "values" in spec:
        spec = spec["values"]
    if isinstance(spec, list):
        return spec[rng.randrange(len(spec))]
    lo, hi, dist = spec["min"], spec["max"], spec.get("distribution", "uniform")
    if dist == "log_uniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    return rng.uniform(lo, hi)


def points(sweep: Sweep) -> list[dict[str, Any]]:
    """The search space's points, in a fixed order: the grid's product, or the seeded random draw."""
    names = list(sweep.parameters)
    if sweep.method == "grid":
        axes = [[(n, v) for v in (spec["values"] if isinstance(spec, dict) else spec)] for n, spec in sweep.parameters.items()]
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
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "trial", *names, sweep.metric, "status", "seconds", "run_dir"])
    for i, t in enumerate(ranked, 1):
        w.writerow([i, t.id, *[t.params.get(n, "") for n in names], "" if t.metric is None else t.metric, t.status,
                    "" if t.seconds is None else t.seconds, str(t.dir)])
    write_text_atomic(sweep.output_dir / RESULTS_CSV, buf.getvalue())


def results_table(sweep: Sweep, ranked: list[Trial]):
    from rich.table import Table

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
    import wandb

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
    import wandb

    try:
        wandb.agent(sweep_id, function=lambda: agent_trial(sweep), count=count)
    except Exception as e:  # no network, unknown sweep, not logged in: one sentence, not a traceback
        raise FtkitError(f"wandb agent {sweep_id}: {e}") from e
