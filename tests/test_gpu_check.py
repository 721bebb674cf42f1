"""bench/gpu_check.py --tiny: the GPU check's QLoRA recipe (nf4, paged_adamw_8bit) runs through ftkit on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, even on a GPU machine
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--json", "--out", str(out), "--work", str(tmp_path / "work")],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report
    assert report["tiny"] and report["device"] == "cpu"
    (run,) = report["runs"]
    assert run["name"] == "single" and "error" not in run
    assert run["tokens_per_sec"] > 0 and run["seconds_per_step"] > 0
    assert math.isfinite(run["loss_first"]) and math.isfinite(run["loss_last"])
    assert run["steps"] == report["steps"] and run["warmup_steps_excluded"] < run["steps"]
    c = run["config"]
    assert (c["quantize"], c["optimizer"], c["method"], c["targets"]) == ("nf4", "paged_adamw_8bit", "lora", "all-linear")
    assert c["gradient_checkpointing"] is True and c["precision"] == "fp32" and c["distributed"] == "none"
    assert "adamw_8bit" in (c["optimizer_note"] or "")  # no CUDA: ftkit said it ran the unpaged optimizer
    assert run["mfu"] is None and run["flops_per_token"] > 0  # no peak FLOP/s for a CPU
    assert (Path(run["run_dir"]) / "metrics.jsonl").exists()


def test_gpu_check_needs_cuda_without_tiny():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--tiny" in proc.stderr
