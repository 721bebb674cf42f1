"""One measured training run of each tool, as a child process, read back into one record.

ftkit runs as a user runs it (`python -m ftkit.cli train RECIPE --backend B --json`) and is read back from
its JSON result, `metrics.jsonl` and `final_state.json`; the baselines are bench/baseline_trainer.py and
bench/baseline_mlx.py, which write `result.json`. Every record carries the loop's start and end (the
tool's own clock), steps, examples consumed, final loss, wall time and peak resident memory; `finish` adds the
achieved model FLOP/s (the data set's FLOPs, harness.flops, over the train seconds).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from harness import process
from harness.datasets import BenchData
from harness.settings import Settings, baseline_config, ftkit_recipe, ftkit_sets

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
BASELINES = {"torch": "baseline_trainer.py", "mlx": "baseline_mlx.py"}


def child_env(work: Path, peak_flops: float | None = None) -> dict:
    """The same environment for every tool. ftkit's cache (tokenized data sets) lives in the work folder: the
    benchmark neither uses nor fills the user's, and the first ftkit run of a data set tokenizes it. `peak_flops`:
    the GEMM peak the benchmark measured, as ftkit's MFU peak (FTKIT_PEAK_FLOPS), so that ftkit probes nothing itself."""
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "backends"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "FTKIT_CACHE": str(work / "ftkit-cache"), **({"FTKIT_PEAK_FLOPS": repr(peak_flops)} if peak_flops else {})}


def _failed(m: process.Measured) -> dict:
    why = f"over the memory cap ({m.peak_rss_bytes / 2**30:.1f} GiB), killed" if m.over_memory_cap else f"exit {m.returncode}"
    return {"error": f"{why}: {m.tail()}", "wall_s": m.wall_s, "peak_rss_bytes": m.peak_rss_bytes, "over_memory_cap": m.over_memory_cap}


def ftkit(backend: str, s: Settings, model: Path, data_folder: Path, run_dir: Path, extra_sets: list[str], timeout: float,
          max_rss_bytes: int | None = None, work: Path | None = None, peak_flops: float | None = None) -> dict:
    run_dir.mkdir(parents=True)
    recipe = run_dir / "recipe-in.toml"
    recipe.write_text(ftkit_recipe(s, model, data_folder, run_dir / "run", backend))
    cmd = [sys.executable, "-m", "ftkit.cli", "train", str(recipe), "--backend", backend, "--json"]
    for item in ftkit_sets(s, extra_sets):
        cmd += ["--set", item]
    m = process.run(cmd, env=child_env(work or run_dir.parent, peak_flops), cwd=run_dir, log_prefix=run_dir / "log", timeout_s=timeout,
                    max_rss_bytes=max_rss_bytes)
    if m.returncode != 0:
        return _failed(m)
    out = json.loads(m.stdout.strip().splitlines()[-1])
    recs = [json.loads(line) for line in (Path(out["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    start = next(r["time"] for r in recs if r.get("kind") == "run")  # logged just before the first step
    train = [r for r in recs if r.get("kind") == "train"]
    state = json.loads((Path(out["run_dir"]) / "final_state.json").read_text())
    return {"start": start, "end": train[-1]["time"], "report_ends": [r["time"] for r in train], "steps": out["steps"],
            "final_loss": train[-1]["loss"], "examples": state["position"], "own_target_tokens": out["stages"][-1]["trained_tokens"],
            "wall_s": m.wall_s, "peak_rss_bytes": m.peak_rss_bytes, "process_start": m.started_at,
            "peak_gpu_memory_gib": max((r["peak_memory_gib"] for r in train if "peak_memory_gib" in r), default=None),
            "own_mfu": [r.get("mfu") for r in train]}  # ftkit's own per-window MFU (its loop's FLOP count)


def baseline(pair: str, s: Settings, model: Path, data: BenchData, run_dir: Path, timeout: float, max_rss_bytes: int | None = None,
             work: Path | None = None) -> dict:
    run_dir.mkdir(parents=True)
    config = run_dir / "config.json"
    config.write_text(json.dumps(baseline_config(s, model, data.file, data.format, run_dir), indent=1))
    m = process.run([sys.executable, str(BENCH / BASELINES[pair]), str(config)], env=child_env(work or run_dir.parent), cwd=run_dir,
                    log_prefix=run_dir / "log", timeout_s=timeout, max_rss_bytes=max_rss_bytes)
    if m.returncode != 0 or not (run_dir / "result.json").exists():
        return _failed(m)
    return {**json.loads((run_dir / "result.json").read_text()), "wall_s": m.wall_s, "peak_rss_bytes": m.peak_rss_bytes,
            "process_start": m.started_at}


def finish(raw: dict, s: Settings, data: BenchData) -> dict:
    """The table's figures from a run's raw record; an error where a run did not do the agreed work."""
    if "error" in raw:
        return raw
    if raw["steps"] != s.steps or raw["examples"] != s.examples:
        return {**raw, "error": f"ran {raw['steps']} steps over {raw['examples']} examples, not {s.steps} over {s.examples}: "
                                "its tokens/s would not be comparable"}
    train_s = raw["end"] - raw["start"]
    return {**raw, "train_s": train_s, "tokens_per_s": data.target_tokens / train_s, "peak_rss_mib": raw["peak_rss_bytes"] / 2**20,
            "flops_per_s": data.flops / train_s if data.flops else None}
