"""Nothing lost, nothing silent: the run-level safety of `ftkit train`.

- Nothing non-finite is ever saved: the weights are checked (not only the loss) before a checkpoint or the
  final adapter; `--resume auto` then finds the newest finite checkpoint. train.on_nonfinite = "skip" skips
  steps with non-finite gradients, counts them, stops after 10 in a row, and keeps resume exact.
- A full disk or a read-only folder is a clear error naming the folder and the space a checkpoint needs; the
  checkpoint before stays complete (a real tmpfs, mounted in the test's folder: root only). Pruning renames
  before it deletes.
- `--resume auto` with a larger train.iters continues a finished run; with other data it is refused
  (unless train.allow_data_change); `--resume latest` is told the word is `auto`.

The signals (SIGTERM, SIGINT, SIGUSR1: a checkpoint, then exit 75) are in tests/test_preemption.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from builders import recipe_file  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from ftkit.common.errors import FtkitError  # noqa: E402
from ftkit.recipe.load import load_recipes  # noqa: E402
from ftkit.train import checkpoint as ckpt  # noqa: E402
from ftkit.train.callbacks import TrainingCallback  # noqa: E402
from ftkit.train.loop import Trainer  # noqa: E402
from ftkit.train.prepare import prepare  # noqa: E402
from ftkit.train.stages import run_stages  # noqa: E402


def trainer(path: Path, *sets: str, backend: str = "torch", callbacks=()) -> Trainer:
    (recipe,) = load_recipes([path], list(sets))
    return Trainer(prepare(recipe), backend, quiet=True, callbacks=callbacks)


def tensors(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_bytes(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta and ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].tobytes() == tb[k].tobytes(), k


def records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def steps_on_disk(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in ckpt.complete_checkpoints(run)]


class StepHook(TrainingCallback):
    """Calls `fn(step)` after every optimizer step (or after each checkpoint: on="save")."""

    def __init__(self, fn, on: str = "step"):
        self.fn, self.on = fn, on

    def on_step_end(self, step, lr):
        if self.on == "step":
            self.fn(step)

    def on_save(self, step, path):
        if self.on == "save":
            self.fn(step)


@pytest.fixture
def poison(monkeypatch):
    """poison(steps, backend="torch"): every micro-batch of those optimizer steps gets a NaN gradient (its loss
    stays finite)."""
    state = {"step": 0, "steps": set()}
    real_step = Trainer._step

    def step(self, st, window):
        state["step"] = st["step"] + 1
        return real_step(self, st, window)

    def arm(steps, backend="torch"):
        if backend == "torch":
            from ftkit_torch.backend import TorchBackend as cls
        else:
            from ftkit_mlx.backend import MlxBackend as cls
        real_fb = cls.forward_backward

        def forward_backward(self, batch, scale, sync=True):
            return real_fb(self, batch, float("nan") if state["step"] in state["steps"] else scale, sync)

        monkeypatch.setattr(cls, "forward_backward", forward_backward)
        state["steps"] = set(steps)

    monkeypatch.setattr(Trainer, "_step", step)
    return arm


# ---------------------------------------------------------------- nothing non-finite is saved

def test_weights_that_went_nan_are_never_saved_and_resume_auto_picks_the_last_finite_checkpoint(tmp_path, tiny_model_dir, small_data, monkeypatch):
    # The issue's run: a checkpoint every step, a report every 3. Step 2's update makes the weights NaN while
    # step 2's own loss (computed before the update) is finite: the loss check alone saved that checkpoint.
    from ftkit_torch.backend import TorchBackend

    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 5, "save_every": 1, "steps_per_report": 3, "lr": 3e4})
    real = TorchBackend.optimizer_step
    calls = []

    def optimizer_step(self, lr, **kw):
        stats = real(self, lr, **kw)
        calls.append(1)
        if len(calls) == 2:
            self.trainable[0].data.fill_(float("nan"))
        return stats

    monkeypatch.setattr(TorchBackend, "optimizer_step", optimizer_step)
    with pytest.raises(FtkitError) as err:
        trainer(p).run()
    msg = str(err.value)
    assert "step 2: the trainable weights hold NaN or inf after step 2" in msg
    assert "step-000001, is from before" in msg and "--resume auto continues from it" in msg
    assert "Lower train.lr (now 30000" in msg and "did you mean 0.0003?" in msg and "train.warmup" in msg
    run = tmp_path / "run-r"
    assert steps_on_disk(run) == [1] and not (run / "adapter").exists()
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    assert all(np.isfinite(v).all() for v in tensors(run / "checkpoints" / "step-000001" / "adapter").values())

    monkeypatch.setattr(TorchBackend, "optimizer_step", real)
    resumed = trainer(p, "train.lr=3e-4").run(resume="auto")
    assert resumed.resumed_from.endswith("step-000001") and resumed.steps == 5
    assert all(np.isfinite(v).all() for v in tensors(resumed.adapter).values())


def test_the_final_adapter_is_checked_too(tmp_path, tiny_model_dir, small_data, monkeypatch):
    from ftkit_torch.backend import TorchBackend

    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 2, "save_every": 10, "steps_per_report": 2})
    monkeypatch.setattr(TorchBackend, "trainable_finite", lambda self: False)
    with pytest.raises(FtkitError, match=r"steps 1-2: the trainable weights hold NaN or inf.*no checkpoint was written yet"):
        trainer(p).run()
    assert not (tmp_path / "run-r" / "adapter").exists() and not (tmp_path / "run-r" / "final_state.json").exists()


def test_trainable_finite_on_both_backends(tmp_path, tiny_model_dir, small_data):
    pytest.importorskip("mlx.core")
    from ftkit.backend.registry import get_backend

    (recipe,) = load_recipes([recipe_file(tmp_path, tiny_model_dir, small_data)])
    for name in ("torch", "mlx"):
        be = get_backend(name)
        be.load(recipe, tiny_model_dir, adapter=None, train=True)
        be.start_training()
        values = be.adapter_tensors()
        assert be.trainable_finite(), name
        key = next(k for k in values if "lora_A" in k)
        be.set_adapter_tensors({**values, key: np.where(np.arange(values[key].size).reshape(values[key].shape) == 5, np.inf, values[key]).astype(np.float32)})
        assert not be.trainable_finite(), name


def test_nan_gradients_stop_the_run_by_default(tmp_path, tiny_model_dir, small_data, poison):
    poison({3})
    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 6, "save_every": 2, "steps_per_report": 6})
    with pytest.raises(FtkitError, match=r"steps 3-4: the trainable weights hold NaN or inf.*step-000002, is from before.*on_nonfinite = \"skip\""):
        trainer(p).run()
    assert steps_on_disk(tmp_path / "run-r") == [2]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_skip_skips_nan_steps_counts_them_and_resumes_exactly(tmp_path, tiny_model_dir, small_data, poison, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    poison({3, 4, 7}, backend)
    kw = dict(method={"dropout": 0.1}, train={"iters": 8, "save_every": 2, "steps_per_report": 1, "on_nonfinite": "skip"})
    trainer = lambda path: globals()["trainer"](path, backend=backend)  # noqa: E731
    whole = trainer(recipe_file(tmp_path, tiny_model_dir, small_data, "whole", **kw)).run()
    log = records(whole.run_dir)
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 2, 2, 2, 3, 3]
    assert [r["loss"] is None for r in log] == [s in (3, 4, 7) for s in range(1, 9)]
    assert all(np.isfinite(v).all() for v in tensors(whole.adapter).values())

    part = recipe_file(tmp_path, tiny_model_dir, small_data, "part", **kw)
    trainer(part).run(stop_after=3)  # stopped right after a skipped step
    resumed = trainer(part).run(resume="auto")
    assert resumed.resumed_from.endswith("step-000003") and resumed.steps == 8
    assert_same_bytes(whole.adapter, resumed.adapter)
    assert [r["skipped_steps"] for r in records(resumed.run_dir)] == [r["skipped_steps"] for r in log]
    assert resumed.trained_tokens == whole.trained_tokens


def test_ten_skips_in_a_row_stop_the_run(tmp_path, tiny_model_dir, small_data, poison):
    poison(range(2, 20))
    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 14, "save_every": 4, "steps_per_report": 1,
                                                                  "on_nonfinite": "skip", "steps_per_eval": 100})
    with pytest.raises(FtkitError, match=r"steps 2-11: 10 steps in a row had non-finite gradients and were skipped"):
        trainer(p).run()
    assert steps_on_disk(tmp_path / "run-r") == [4, 8]  # the skipped steps left the weights finite


# ---------------------------------------------------------------- disks and permissions

@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs mounted in the test's folder (root only); unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "disk"
    where.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(where)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"could not mount a tmpfs: {out.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_a_clear_error_and_the_checkpoint_before_stays_complete(tmp_path, tiny_model_dir, small_data, tmpfs):
    run = tmpfs / "run"
    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 8, "save_every": 2, "steps_per_eval": 100},
                    output={"dir": str(run)})
    filler = tmpfs / "filler"

    def fill(step):  # after the first checkpoint, leave ~48 KB: a checkpoint needs ~150 KB
        if step == 2:
            filler.write_bytes(b"\0" * (shutil.disk_usage(tmpfs).free - 48_000))

    with pytest.raises(FtkitError) as err:
        trainer(p, callbacks=[StepHook(fill, on="save")]).run()
    msg = str(err.value)
    size = ckpt.folder_bytes(run / "checkpoints" / "step-000002")
    assert f"{run / 'checkpoints'}: the disk is full" in msg and f"a checkpoint needs about {ckpt.human(size)}" in msg
    assert "newest complete checkpoint is unchanged" in msg
    assert steps_on_disk(run) == [2] and [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]

    filler.unlink()
    resumed = trainer(p).run(resume="auto")
    assert resumed.resumed_from.endswith("step-000002") and resumed.steps == 8


def test_read_only_folders_are_refused_up_front(tmp_path, tiny_model_dir, small_data, tmpfs):
    run = tmpfs / "run"
    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 4, "save_every": 2}, output={"dir": str(run)})
    trainer(p).run(stop_after=2)
    assert subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True).returncode == 0
    with pytest.raises(FtkitError, match=re.escape(f"{run} is not writable (Read-only file system)") + ".*copy the run folder.*--resume auto"):
        trainer(p).run(resume="auto")
    fresh = recipe_file(tmp_path, tiny_model_dir, small_data, "fresh", output={"dir": str(tmpfs / "new")})
    with pytest.raises(FtkitError, match=r"new is not writable.*Set output.dir"):
        trainer(fresh).run()
    assert steps_on_disk(run) == [2]


def test_a_write_problem_is_named_whatever_the_library_calls_it(tmp_path, monkeypatch):
    # torch.save and safetensors report a full disk in their own words
    need = 5_000_000
    for err in (RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed"),
                Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
                OSError(28, "No space left on device")):
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
        assert "the disk is full (1.0 KB free); a checkpoint needs about 5.0 MB" in ckpt.write_problem(tmp_path, err, need)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 0, 10**12))
    assert ckpt.write_problem(tmp_path, ValueError("a bug, not the disk"), need) is None
    assert "is not writable" in ckpt.write_problem(tmp_path, OSError(30, "Read-only file system"), need)


def test_the_start_warns_when_two_checkpoints_do_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 150_000, 150_000))
    need = ckpt.checkpoint_bytes(tmp_path, 8192, "adamw")  # no checkpoint yet: float32 values + Adam's two moments
    assert need == 8192 * 12 + 65536
    assert "has 150.0 KB free, and a checkpoint needs about 163.8 KB" in ckpt.space_warning(tmp_path, need, 2)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 0, 10**9))
    assert ckpt.space_warning(tmp_path, need, 2) is None
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000004" / ckpt.STATE_FILE).write_text("{}")
    (tmp_path / "checkpoints" / "step-000004" / "blob").write_bytes(b"x" * 1000)
    assert ckpt.checkpoint_bytes(tmp_path, 8192, "adamw") == 1002  # the newest checkpoint's size, once there is one


def test_a_kill_mid_prune_leaves_nothing_that_looks_like_a_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2, 3, 4):
        d = ckpt.checkpoint_dir(tmp_path, step)
        (d / "adapter").mkdir(parents=True)
        (d / "adapter" / "weights").write_bytes(b"w" * 100)
        (d / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))

    def killed(path, **kw):  # the process dies inside rmtree: part of the folder is gone
        (Path(path) / ckpt.STATE_FILE).unlink(missing_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(tmp_path, 2)
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f".step-000001.pruned-{os.getpid()}", "step-000002", "step-000003", "step-000004"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000004"
    assert [p.name for p in ckpt.clean_partial(tmp_path)] == [names[0]]
    ckpt.prune(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000004"]


# ---------------------------------------------------------------- --resume: nothing silent

def test_resume_auto_with_more_iters_continues_a_finished_run(tmp_path, tiny_model_dir, small_data):
    from ftkit.train.schedule import lr_at

    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 2, "save_every": 1, "steps_per_report": 1})
    (first,) = run_stages(load_recipes([p]), "torch", quiet=True)
    assert first.steps == 2
    two = tensors(first.adapter)
    (again,) = run_stages(load_recipes([p]), "torch", resume="auto", quiet=True)  # same iters: reported, not retrained
    assert again.resumed_from == "finished earlier"

    (recipe,) = load_recipes([p], ["train.iters=4"])
    (more,) = run_stages([recipe], "torch", resume="auto", quiet=True)
    assert more.steps == more.total_steps == 4 and more.resumed_from.endswith("step-000001")
    assert any((tensors(more.adapter)[k] != two[k]).any() for k in two)
    log = records(more.run_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    schedule = prepare(recipe).schedule
    np.testing.assert_allclose([r["lr"] for r in log[1:]], [lr_at(s, recipe.train, schedule) for s in (2, 3, 4)])
    assert json.loads((more.run_dir / "final_state.json").read_text())["step"] == 4


def test_a_finished_run_without_checkpoints_is_not_retrained_from_scratch(tmp_path, tiny_model_dir, small_data):
    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 2, "save_every": 10})
    run_stages(load_recipes([p]), "torch", quiet=True)
    before = (tmp_path / "run-r" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FtkitError, match=r"finished at step 2; the recipe now asks for 4 steps.*no checkpoint.*method.resume_from="):
        run_stages(load_recipes([p], ["train.iters=4"]), "torch", resume="auto", quiet=True)
    assert (tmp_path / "run-r" / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_resume_onto_other_data_is_refused_unless_allowed(tmp_path, tiny_model_dir, small_data, wikisql_dir):
    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 4, "save_every": 2})
    trainer(p).run(stop_after=2)
    state = ckpt.read_state(tmp_path / "run-r" / "checkpoints" / "step-000002")
    assert state["data_fingerprint"].startswith("sha256:")
    trainer(p).run(resume="auto", stop_after=3)  # the same data: resumes
    rows = (wikisql_dir / "train.jsonl").read_text().splitlines()[100:148]
    (small_data / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(FtkitError, match=r"trained on other data.*data position \(12 examples\).*train.allow_data_change=true"):
        trainer(p).run(resume="auto")
    result = trainer(p, "train.allow_data_change=true").run(resume="auto")
    assert result.steps == 4


def test_resume_with_another_word_is_told_the_word_is_auto(tmp_path):
    for word in ("latest", "last", "Auto"):
        with pytest.raises(FtkitError, match=rf"--resume {word}: no such checkpoint or run folder. The word is `auto`"):
            run_stages([], "torch", resume=word)


def test_a_checkpoint_past_the_new_end_is_refused(tmp_path, tiny_model_dir, small_data):
    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 6, "save_every": 2})
    trainer(p).run(stop_after=4)
    with pytest.raises(FtkitError, match=r"step-000004 is at step 4, past this recipe's 3 steps"):
        trainer(p, "train.iters=3").run(resume="auto")


def test_signal_handlers_are_restored_after_a_run(tmp_path, tiny_model_dir, small_data):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    trainer(recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 1})).run()
    assert {s: signal.getsignal(s) for s in before} == before
