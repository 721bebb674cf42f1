"""A run survives SIGKILL: the `ftkit train --resume auto` command a pod runs on every (re)start.

The run is killed for real (SIGKILL, as a preempted pod's processes are), in a separate process, and
started again with the same command line; it must end where an unbroken run ends, to the bit (dropout
on: the RNG state comes back from the checkpoint too), with a clean metrics log and no temporary
folders left. Started once more, the finished run is reported, not retrained.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from builders import recipe_file  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

ITERS = 120  # ~50 ms a step on a 2-core CPU: the run is still going seconds after the kill point
SAVE_EVERY = 4
KILL_AFTER = 12  # kill once a complete checkpoint at this step or later exists
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def train_cmd(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "ftkit.cli", "train", str(recipe), "--backend", "torch", "--resume", "auto", "--json"]


def start(recipe: Path, log: Path) -> subprocess.Popen:
    # Output to files, not pipes: nobody reads a pipe while the test polls, and a full pipe blocks.
    return subprocess.Popen(train_cmd(recipe), env=ENV, stdout=open(log.with_suffix(".out"), "w"),
                            stderr=open(log.with_suffix(".err"), "w"))


def result_of(proc: subprocess.Popen, log: Path) -> dict:
    assert proc.wait(timeout=300) == 0, log.with_suffix(".err").read_text()[-3000:]
    return json.loads(log.with_suffix(".out").read_text().strip().splitlines()[-1])


def complete_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*/trainer_state.json"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_sigkill_mid_run_then_resume_auto_ends_with_the_unbroken_runs_adapter(tmp_path, tiny_model_dir, small_data):
    kw = dict(method={"dropout": 0.1},
              train={"iters": ITERS, "save_every": SAVE_EVERY, "steps_per_eval": 40, "steps_per_report": 1})
    whole = recipe_file(tmp_path, tiny_model_dir, small_data, "whole", **kw)
    part = recipe_file(tmp_path, tiny_model_dir, small_data, "part", **kw)
    run = tmp_path / "run-part"

    # The unbroken run trains alongside (one thread each; the machine has two cores).
    unbroken = start(whole, tmp_path / "whole")
    victim = start(part, tmp_path / "part-1")
    deadline = time.monotonic() + 180
    while not (complete_steps(run) and complete_steps(run)[-1] >= KILL_AFTER):
        assert victim.poll() is None, "the run ended before a checkpoint appeared:\n" + (tmp_path / "part-1.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.01)
    assert victim.poll() is None, f"the run had finished before the kill (ITERS={ITERS} is too few here)"
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert victim.wait(timeout=30) == -signal.SIGKILL
    newest = complete_steps(run)[-1]
    assert KILL_AFTER <= newest < ITERS and not (run / "adapter").exists() and not (run / "final_state.json").exists()

    # What a kill during a checkpoint write can leave: a temporary folder (here one that even holds a
    # state file), and a step folder without its state file (written last). Neither may be resumed from.
    ckpts = run / "checkpoints"
    fake_tmp = ckpts / f".step-{newest + SAVE_EVERY:06d}.tmp-123"
    fake_tmp.mkdir()
    (fake_tmp / "trainer_state.json").write_text(json.dumps({"step": newest + SAVE_EVERY}))
    (ckpts / f"step-{newest + 2 * SAVE_EVERY:06d}").mkdir()  # the resumed run saves this step later, over it

    resumed = subprocess.run(train_cmd(part), env=ENV, capture_output=True, text=True, timeout=300)
    kill_to_done = time.monotonic() - killed_at
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = json.loads(resumed.stdout.strip().splitlines()[-1])
    print(f"\nkilled after step-{newest:06d}; kill -> resumed run finished: {kill_to_done:.1f} s")
    assert res["stages"][0]["resumed_from"] == str(ckpts / f"step-{newest:06d}")
    ref = result_of(unbroken, tmp_path / "whole")
    assert res["steps"] == ref["steps"] == ITERS

    # The same adapter as the unbroken run's.
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run-whole" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)

    # The log: every step once, and the same losses as the unbroken run's (not just the same end).
    got, want = records(run), records(tmp_path / "run-whole")
    for kind in ("train", "valid"):
        steps = [r["step"] for r in got if r["kind"] == kind]
        assert steps == sorted(set(steps)), f"{kind} steps duplicated after the resume: {steps}"
        assert steps == [r["step"] for r in want if r["kind"] == kind]
        np.testing.assert_allclose([r["loss"] for r in got if r["kind"] == kind],
                                   [r["loss"] for r in want if r["kind"] == kind], rtol=1e-6)
    assert [r["step"] for r in got if r["kind"] == "train"] == list(range(1, ITERS + 1))

    # Nothing half-written is left, and every step folder that is left is complete.
    leftovers = [p for p in run.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
    assert leftovers == []
    assert all((p / "trainer_state.json").is_file() for p in ckpts.iterdir())

    # Started once more (the pod restarts after the run is done): reported, not retrained.
    adapter_file = run / "adapter" / "adapter_model.safetensors"
    before = adapter_file.stat().st_mtime_ns
    again = subprocess.run(train_cmd(part), env=ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert out["stages"][0]["resumed_from"] == "finished earlier" and out["steps"] == ITERS
    assert adapter_file.stat().st_mtime_ns == before
    assert len(records(run)) == len(got)


def test_a_run_killed_before_its_first_checkpoint_starts_with_a_clean_log(tmp_path, tiny_model_dir, small_data):
    # What a run killed at step 3 with no checkpoint yet leaves (the kill itself is the test above;
    # here the leftover state is written directly, so that no timing is involved).
    p = recipe_file(tmp_path, tiny_model_dir, small_data, "early", train={"iters": 4, "save_every": 100})
    run = tmp_path / "run-early"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "kind": "train", "loss": 9.0}) + "\n"
                                               for s in (1, 2, 3)))
    from ftkit.recipe.load import load_recipes
    from ftkit.train.stages import run_stages

    (result,) = run_stages(load_recipes([p]), "torch", resume="auto", quiet=True)
    assert result.steps == 4
    steps = [r["step"] for r in records(run) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
