"""A run survives SIGKILL and stops cleanly on a signal: the `ftkit train --resume auto` command a pod runs
on every (re)start.

The run is killed for real (SIGKILL, as a preempted pod's processes are), in a separate process, and
started again with the same command line; it must end where an unbroken run ends, to the bit (dropout
on: the RNG state comes back from the checkpoint too), with a clean metrics log and no temporary
folders left. Started once more, the finished run is reported, not retrained.

SIGTERM, SIGINT and SIGUSR1 finish the step, write a checkpoint and exit 75 ("resume me"): no step is
lost, and the resumed run's adapter is byte-equal to the unbroken run's (torch: all three, one after the
other; MLX: SIGTERM; two processes: a signal to rank 0 alone). A second signal exits at once.
deploy/runpod/start.sh passes a signal on to ftkit and starts it again on 75.
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


# ---------------------------------------------------------------- signals: a checkpoint, then exit 75

SIGNAL_ITERS = 80
EXIT_RESUME = 75


def logged_steps(run: Path) -> list[int]:
    """The train steps in the metrics log so far (a line being written is skipped)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("kind") == "train":
            out.append(r["step"])
    return out


def interrupt(proc: subprocess.Popen, run: Path, sig: signal.Signals, after: int, log: Path) -> tuple[int, float]:
    """Send `sig` once the run has logged `after` more steps than it had; (the step it stopped at, signal-to-exit seconds)."""
    start_at = max(logged_steps(run), default=0)
    deadline = time.monotonic() + 180
    while max(logged_steps(run), default=0) < start_at + after:
        assert proc.poll() is None, f"the run ended before {sig.name}:\n" + log.with_suffix(".err").read_text()[-3000:]
        assert time.monotonic() < deadline, f"no training within 180 s before {sig.name}"
        time.sleep(0.01)
    sent, sent_wall = time.monotonic(), time.time()
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=120)
    took = time.monotonic() - sent
    err = log.with_suffix(".err").read_text()
    assert code == EXIT_RESUME, f"{sig.name}: exit {code}\n{err[-3000:]}"
    stopped = complete_steps(run)[-1]
    saved = (run / "checkpoints" / f"step-{stopped:06d}" / "trainer_state.json").stat().st_mtime - sent_wall
    print(f"\n{sig.name}: checkpoint of step {stopped} complete {saved:.2f} s after the signal, process gone after {took:.2f} s")
    assert f"stopped by {sig.name} after step {stopped} of {SIGNAL_ITERS}" in " ".join(err.split())
    # No step lost: the checkpoint is at the last step the run logged, not at the last scheduled save.
    assert max(logged_steps(run)) == stopped and stopped < SIGNAL_ITERS
    return stopped, took


def assert_same_run(run: Path, ref: Path) -> None:
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), f"{k}: not byte-equal to the unbroken run's"
    got, want = records(run), records(ref)
    for kind in ("train", "valid"):
        assert [r["step"] for r in got if r["kind"] == kind] == [r["step"] for r in want if r["kind"] == kind], kind
        assert [r["loss"] for r in got if r["kind"] == kind] == [r["loss"] for r in want if r["kind"] == kind], kind
    assert [r["step"] for r in got if r["kind"] == "train"] == list(range(1, SIGNAL_ITERS + 1))
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or ".old-" in p.name or ".pruned-" in p.name]


def signal_recipes(tmp_path, tiny_model_dir, small_data):
    kw = dict(method={"dropout": 0.1},
              train={"iters": SIGNAL_ITERS, "save_every": 16, "steps_per_eval": 6, "steps_per_report": 1})
    return (recipe_file(tmp_path, tiny_model_dir, small_data, "whole", **kw),
            recipe_file(tmp_path, tiny_model_dir, small_data, "part", **kw))


def test_sigterm_sigint_sigusr1_checkpoint_exit_75_and_resume_to_the_unbroken_adapter(tmp_path, tiny_model_dir, small_data):
    whole, part = signal_recipes(tmp_path, tiny_model_dir, small_data)
    run = tmp_path / "run-part"
    unbroken = start(whole, tmp_path / "whole")
    times = {}
    for i, sig in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)):
        log = tmp_path / f"part-{i}"
        stopped, times[sig.name] = interrupt(start(part, log), run, sig, after=4, log=log)
        assert ckpt_state(run, stopped)["step"] == stopped
    done = subprocess.run(train_cmd(part), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert result_of(unbroken, tmp_path / "whole")["steps"] == SIGNAL_ITERS
    assert_same_run(run, tmp_path / "run-whole")
    print("\nsignal -> exit (s): " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))


def test_sigterm_on_mlx_checkpoints_and_resumes_to_the_unbroken_adapter(tmp_path, tiny_model_dir, small_data):
    pytest.importorskip("mlx.core")
    whole, part = signal_recipes(tmp_path, tiny_model_dir, small_data)
    run = tmp_path / "run-part"
    cmd = lambda r: ["mlx" if a == "torch" else a for a in train_cmd(r)]  # noqa: E731
    unbroken = subprocess.Popen(cmd(whole), env=ENV, stdout=open(tmp_path / "whole.out", "w"), stderr=open(tmp_path / "whole.err", "w"))
    victim = subprocess.Popen(cmd(part), env=ENV, stdout=open(tmp_path / "part.out", "w"), stderr=open(tmp_path / "part.err", "w"))
    stopped, took = interrupt(victim, run, signal.SIGTERM, after=6, log=tmp_path / "part")
    done = subprocess.run(cmd(part), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["stages"][0]["resumed_from"].endswith(f"step-{stopped:06d}")
    assert result_of(unbroken, tmp_path / "whole")["backend"] == "mlx"
    assert_same_run(run, tmp_path / "run-whole")
    print(f"\nMLX: SIGTERM after step {stopped} -> exit {took:.2f} s")


def ckpt_state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").read_text())


class SignalAt:
    """A callback that sends `sig` to this very process at the end of optimizer step `step`."""

    def __new__(cls, step: int, sig: signal.Signals):
        from ftkit.train.callbacks import TrainingCallback

        class _Hook(TrainingCallback):
            def on_step_end(self, at, lr):
                if at == step:
                    os.kill(os.getpid(), sig)

        return _Hook()


def test_a_signal_in_process_stops_after_its_step_and_defers_a_due_validation(tmp_path, tiny_model_dir, small_data, monkeypatch):
    # Deterministic: the run signals itself at the end of step 6, a validation step. It writes the checkpoint
    # at once and leaves the validation to the resumed run, whose log then equals the unbroken run's.
    from ftkit.recipe.load import load_recipes
    from ftkit.train import stages
    from ftkit.train.interrupt import Interrupted
    from ftkit.train.loop import Trainer
    from ftkit.train.prepare import prepare

    def trainer(path: Path, *callbacks) -> Trainer:
        return Trainer(prepare(load_recipes([path])[0]), "torch", quiet=True, callbacks=callbacks)

    kw = dict(method={"dropout": 0.1}, train={"iters": 9, "save_every": 4, "steps_per_eval": 3, "steps_per_report": 2})
    whole = recipe_file(tmp_path, tiny_model_dir, small_data, "whole", **kw)
    part = recipe_file(tmp_path, tiny_model_dir, small_data, "part", **kw)
    ref = trainer(whole).run()
    stopped = trainer(part, SignalAt(6, signal.SIGUSR1)).run()
    assert stopped.interrupted == "SIGUSR1" and stopped.steps == 6
    assert ckpt_state(stopped.run_dir, 6)["pending_eval"] == 6
    assert [r["step"] for r in records(stopped.run_dir) if r["kind"] == "valid"] == [0, 3]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handed back after the run

    # What `ftkit train` runs: run_stages raises Interrupted, a SystemExit with code 75.
    real = stages.Trainer
    monkeypatch.setattr(stages, "Trainer", lambda prep, backend, quiet: real(prep, backend, quiet=quiet,
                                                                               callbacks=[SignalAt(7, signal.SIGTERM)]))
    with pytest.raises(Interrupted) as exc:
        stages.run_stages(load_recipes([part]), "torch", resume="auto", quiet=True)
    assert exc.value.code == EXIT_RESUME and "stopped by SIGTERM after step 7 of 9" in exc.value.message
    monkeypatch.undo()

    result = trainer(part).run(resume="auto")
    assert result.steps == 9 and result.interrupted is None
    a = load_file(str(result.adapter / "adapter_model.safetensors"))
    b = load_file(str(ref.adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in b)
    got, want = records(result.run_dir), records(ref.run_dir)
    for kind in ("train", "valid"):
        assert [(r["step"], r["loss"]) for r in got if r["kind"] == kind] == [(r["step"], r["loss"]) for r in want if r["kind"] == kind]


def test_sigint_and_sigusr1_on_mlx_stop_after_their_step_and_resume_to_the_unbroken_adapter(tmp_path, tiny_model_dir, small_data):
    # The subprocess test above sends MLX a real SIGTERM; here the other two signals, in process (deterministic).
    pytest.importorskip("mlx.core")
    from ftkit.recipe.load import load_recipes
    from ftkit.train.loop import Trainer
    from ftkit.train.prepare import prepare

    def trainer(path: Path, *callbacks) -> Trainer:
        return Trainer(prepare(load_recipes([path])[0]), "mlx", quiet=True, callbacks=callbacks)

    kw = dict(method={"dropout": 0.1}, train={"iters": 8, "save_every": 8, "steps_per_eval": 4, "steps_per_report": 2})
    ref = trainer(recipe_file(tmp_path, tiny_model_dir, small_data, "whole", **kw)).run()
    part = recipe_file(tmp_path, tiny_model_dir, small_data, "part", **kw)
    first = trainer(part, SignalAt(3, signal.SIGINT)).run()
    second = trainer(part, SignalAt(6, signal.SIGUSR1)).run(resume="auto")
    assert (first.interrupted, first.steps, second.interrupted, second.steps) == ("SIGINT", 3, "SIGUSR1", 6)
    done = trainer(part).run(resume="auto")
    assert done.steps == 8 and done.interrupted is None
    a = load_file(str(done.adapter / "adapter_model.safetensors"))
    b = load_file(str(ref.adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert [r["loss"] for r in records(done.run_dir) if r["kind"] == "train"] == [r["loss"] for r in records(ref.run_dir) if r["kind"] == "train"]


def test_a_second_signal_exits_at_once_and_a_repeat_within_a_second_is_the_same_request(tmp_path):
    code = (
        "import os, signal, sys, time\n"
        "from ftkit.train.interrupt import StopSignals\n"
        "with StopSignals(lambda m: print('said', m, flush=True)) as s:\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05)  # a launcher's copy of the same request\n"
        "    print('first', s.name, flush=True)\n"
        "    time.sleep(1.2)\n"
        "    t = time.monotonic(); print('second at', t, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "print('not reached', flush=True)\n"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGINT, out.stdout + out.stderr
    assert "first SIGTERM" in out.stdout and out.stdout.count("said") == 1 and "not reached" not in out.stdout
    assert "SIGINT again: exiting now" in out.stderr
    assert time.monotonic() - t0 < 20  # not the 30 s sleep


# ---------------------------------------------------------------- deploy/runpod/start.sh and exit 75

START = Path(__file__).resolve().parents[1] / "deploy" / "runpod" / "start.sh"


def fake_ftkit(tmp_path: Path, body: str) -> dict[str, str]:
    """An `ftkit` first on PATH running `body` (bash); $N is how many times it was started."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    stub = bin_dir / "ftkit"
    count = tmp_path / "starts"
    stub.write_text("#!/usr/bin/env bash\n"
                    f'N=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $N > {count}\n'
                    'echo "START $N: $*"\n' + body)
    stub.chmod(0o755)
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "WORKSPACE": str(tmp_path), "FTKIT_LOG_DIR": str(tmp_path / "logs"), "FTKIT_RECIPE": "r.toml"}


@pytest.mark.skipif(sys.platform == "win32", reason="bash start script")
def test_start_script_starts_ftkit_again_after_exit_75(tmp_path):
    env = fake_ftkit(tmp_path, 'if [ "$N" -lt 3 ]; then exit 75; fi\nexit 0\n')
    out = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith("START")] == ["START 1", "START 2", "START 3"]
    assert all(line.endswith("train r.toml --backend torch --resume auto") for line in out.stdout.splitlines() if line.startswith("START"))
    assert out.stderr.count("starting it again with --resume auto") == 2
    # a run that keeps stopping is not restarted forever
    (tmp_path / "starts").unlink()
    env.update(FTKIT_MAX_RESTARTS="1")
    (tmp_path / "fakebin" / "ftkit").write_text((tmp_path / "fakebin" / "ftkit").read_text().replace('"$N" -lt 3', '"$N" -lt 99'))
    out = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == EXIT_RESUME and out.stdout.count("START") == 2


@pytest.mark.skipif(sys.platform == "win32", reason="bash start script")
def test_start_script_passes_sigterm_on_and_waits_for_the_checkpoint(tmp_path):
    # The pod stops: SIGTERM reaches the start script (PID 1), not ftkit. It must pass it on, wait for ftkit
    # to write its checkpoint and exit 75, then exit 75 itself, without starting ftkit again.
    env = fake_ftkit(tmp_path, "trap 'echo \"got TERM\"; sleep 1; echo saved; exit 75' TERM\n"
                               "echo ready; sleep 60 & wait $!\n")
    proc = subprocess.Popen(["bash", str(START)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "starts").exists() or not list((tmp_path / "logs").glob("*.log")) or \
            "ready" not in next((tmp_path / "logs").glob("*.log")).read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_RESUME, stderr
    assert stdout.count("got TERM") == 1 and "saved" in stdout and stdout.count("START") == 1
    assert "got SIGTERM: passing it on to ftkit" in stderr and "ftkit exited with 75" in stderr


def test_a_signal_to_rank_0_alone_stops_every_process_after_the_same_step(tmp_path, tiny_model_dir, small_data):
    # Two processes (DDP over gloo, as test_distributed runs them). Only rank 0 gets SIGUSR1; the processes
    # agree at the end of each step (an all-reduce of the stop flag) and write one checkpoint together.
    pytest.importorskip("accelerate")
    import socket
    import uuid

    from builders import PYTHONPATH

    tag = uuid.uuid4().hex
    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, "ddp",
                         train={"iters": SIGNAL_ITERS, "batch_size": 2, "save_every": 16, "steps_per_eval": 40, "steps_per_report": 1},
                         data={"packing": "off"}, torch={"precision": "fp32", "distributed": "ddp"})
    run = tmp_path / "run-ddp"

    def launch(*args: str) -> subprocess.Popen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**ENV, "PYTHONPATH": PYTHONPATH, "FTKIT_SIGNAL_TEST": tag}
        return subprocess.Popen([sys.executable, "-m", "ftkit.cli", "launch", str(recipe), "--nproc-per-node", "2",
                                 "--main-port", str(port), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def rank_pid(rank: int) -> int | None:
        for proc in Path("/proc").iterdir():
            try:
                env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
                cmd = (proc / "cmdline").read_text()
            except (OSError, ValueError):
                continue
            if env.get("FTKIT_SIGNAL_TEST") == tag and env.get("RANK") == str(rank) and "ftkit.cli\0train" in cmd:
                return int(proc.name)
        return None

    first = launch()
    deadline = time.monotonic() + 240
    while max(logged_steps(run), default=0) < 6:
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no training within 240 s"
        time.sleep(0.05)
    os.kill(rank_pid(0), signal.SIGUSR1)
    out = first.communicate(timeout=240)[0]
    assert first.returncode == EXIT_RESUME, out[-3000:]  # accelerate exits 1; launch reads the workers' word
    stopped = complete_steps(run)[-1]
    assert f"stopped by SIGUSR1 after step {stopped} of {SIGNAL_ITERS}" in " ".join(out.split()), out[-3000:]
    assert max(logged_steps(run)) == stopped < SIGNAL_ITERS
    state = run / "checkpoints" / f"step-{stopped:06d}" / "state"
    assert (state / "rank0.pt").is_file() and (state / "rank1.pt").is_file()  # rank 1 saved the same step
    second = launch("--resume", "auto")
    out = second.communicate(timeout=300)[0]
    assert second.returncode == 0, out[-3000:]
    assert logged_steps(run) == list(range(1, SIGNAL_ITERS + 1))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_launch_passes_a_signal_to_every_worker_once_and_exits_75_when_they_checkpointed(tmp_path):
    # A stand-in for `accelerate launch`: a parent that starts two workers in its process group and exits 1 when
    # any worker fails (as accelerate does). Each worker, on SIGTERM, "checkpoints" (tells the launcher) and exits 75.
    worker = (
        "import os, signal, sys, time\n"
        "from ftkit.train.interrupt import tell_launcher\n"
        "def stop(sig, frame):\n"
        "    open(sys.argv[1], 'a').write(f'{os.getpid()} {signal.Signals(sig).name}\\n'); tell_launcher(); sys.exit(75)\n"
        "signal.signal(signal.SIGTERM, stop); signal.signal(signal.SIGINT, stop)\n"
        "open(sys.argv[1] + '.ready', 'a').write('x')\n"
        "time.sleep(60)\n"
    )
    launcher = (
        "import subprocess, sys, signal\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # a launcher that waits for its workers
        f"procs = [subprocess.Popen([sys.executable, '-c', {worker!r}, sys.argv[1]]) for _ in range(2)]\n"
        "sys.exit(1 if any(p.wait() for p in procs) else 0)\n"
    )
    heard = tmp_path / "heard"
    main = ("import sys; from pathlib import Path; from ftkit.train.interrupt import run_forwarding\n"
            f"sys.exit(run_forwarding([sys.executable, '-c', {launcher!r}, {str(heard)!r}], Path({str(tmp_path / 'status')!r})))\n")
    proc = subprocess.Popen([sys.executable, "-c", main], env=ENV)
    ready = Path(str(heard) + ".ready")
    deadline = time.monotonic() + 60
    while not (ready.exists() and len(ready.read_text()) == 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_RESUME
    lines = heard.read_text().splitlines()
    assert len(lines) == 2 and len({line.split()[0] for line in lines}) == 2 and all(line.endswith("SIGTERM") for line in lines)
