"""The one training loop, shared by every backend.

The loop decides what data each step sees, how micro-batches are weighted, the learning rate, when to
report, validate and checkpoint, and how a run resumes. A backend only does the tensor math; the metrics
log (and the trackers it feeds) and the progress bar hear about each step as callbacks. Nothing non-finite
is saved (ftkit.train.guard); a signal ends the run after its step with a checkpoint (ftkit.train.interrupt).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.adapters import meta as adapter_format
from ftkit.adapters import resolve as adapter_layout
from ftkit.backend.objectives import Preference
from ftkit.common.atomic import atomic_dir, write_json_atomic, write_text_atomic
from ftkit.common.console import console
from ftkit.data import batching
from ftkit.train import checkpoint as ckpt
from ftkit.train import prepare
from ftkit.train.callbacks import CallbackList, TrainingCallback
from ftkit.train.flops import Meter
from ftkit.train.guard import MAX_SKIPS_IN_A_ROW, nonfinite_error
from ftkit.train.interrupt import StopSignals
from ftkit.train.metrics import MetricsCallback, MetricsLog
from ftkit.train.progress import ProgressCallback
from ftkit.train.schedule import lr_at
from ftkit.train.tracking import for_recipe, hardware_summary
from ftkit.train.validate import evaluate, evaluate_pairs, value


@dataclass
class StageResult:
    name: str
    backend: str
    run_dir: Path
    adapter: Path
    steps: int
    total_steps: int
    first_valid_loss: float | None = None
    last_valid_loss: float | None = None
    last_train_loss: float | None = None
    trained_tokens: int = 0
    seconds: float = 0.0
    resumed_from: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    interrupted: str | None = None  # the signal that stopped the run after its checkpoint (exit 75: resume me)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["run_dir"], d["adapter"] = str(self.run_dir), str(self.adapter)
        return d


@dataclass
class Window:
    """The steps since the last report; their loss (and a preference objective's metrics) stay on the device
    until the report sums them."""

    t: float  # when the window opened, moved on by the time spent validating since
    loss: Any = 0.0
    targets: int = 0  # what the loss is a mean over: target tokens, or pairs for a preference objective
    tokens: int = 0
    steps: int = 0
    sums: dict[str, Any] = field(default_factory=dict)  # preference metrics, summed over pairs

    def add_loss(self, out: Any) -> None:
        """A micro-batch's result: the loss sum, or a preference step's dict of sums."""
        if isinstance(out, dict):
            for k, v in out.items():
                if k != "loss":
                    self.sums[k] = self.sums.get(k, 0.0) + v
            out = out["loss"]
        self.loss += out

    def add(self, share: batching.Share, skipped: bool = False) -> None:
        """A step's tokens; a skipped step's targets do not count toward the loss (its loss is not added)."""
        self.targets, self.tokens, self.steps = self.targets + (0 if skipped else share.weight), self.tokens + share.tokens, self.steps + 1

    def restart(self, t: float) -> None:
        self.t, self.loss, self.targets, self.tokens, self.steps, self.sums = t, 0.0, 0, 0, 0, {}

    def saved(self, loss_sum: float, sums: dict[str, float]) -> dict[str, Any]:
        """What a checkpoint keeps of an open window (the sums: over all processes), so that the resumed run's
        next report covers the same steps as an unbroken run's."""
        return {"loss": loss_sum, "sums": sums, "targets": self.targets, "tokens": self.tokens, "steps": self.steps,
                "seconds": time.perf_counter() - self.t}

    @classmethod
    def restored(cls, saved: dict[str, Any] | None, main: bool) -> Window:
        now = time.perf_counter()
        if not saved:
            return cls(t=now)
        return cls(t=now - saved["seconds"], loss=saved["loss"] if main else 0.0,  # the sums are summed once
                   targets=saved["targets"], tokens=saved["tokens"], steps=saved["steps"],
                   sums=dict(saved.get("sums", {})) if main else {k: 0.0 for k in saved.get("sums", {})})


class Trainer:
    def __init__(self, prep: prepare.Prepared, backend_name: str, *, start_adapter: Path | None = None, quiet: bool = False,
                 callbacks: Sequence[TrainingCallback] = ()):
        self.prep, self.recipe, self.schedule = prep, prep.recipe, prep.schedule
        self.run_dir = prep.run_dir
        self.backend_name = backend_name
        if start_adapter is None and self.recipe.method.resume_from:
            start_adapter = Path(self.recipe.method.resume_from)
        self.start_adapter = adapter_layout.resolve(start_adapter) if start_adapter is not None else None
        self.world = prep.world
        self.main = self.world.is_main  # only the first process writes the run folder and prints
        self.quiet = quiet or not self.main
        self.pad_id = prep.tokenizer.pad_token_id
        self.packing = self.recipe.packs
        self.pref = Preference.of(self.recipe.train)
        self._valid_reference: dict[int, Any] = {}  # DPO: the reference's log-probs of each validation micro-batch
        self._lengths: list[int] | None = None
        log = MetricsLog(self.run_dir, enabled=self.main, trackers=for_recipe(self.recipe, self.run_dir) if self.main else None)
        self.callbacks = CallbackList([MetricsCallback(log, self.run_dir / "loss.png", self.recipe.name),
                                       ProgressCallback(self.schedule.total_steps, enabled=not self.quiet), *callbacks])
        self.signals, self.stopped = StopSignals(self._say), False
        self.window = Window(t=time.perf_counter())
        self._saved_step: int | None = None  # the step of the newest checkpoint in the run folder
        self._finite_step = 0  # the newest step whose weights were checked finite

    def _say(self, msg: str) -> None:
        if not self.quiet:
            console().print(msg)

    def _meta(self, state: dict[str, Any]) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "method": self.recipe.method.kind,
            "recipe": self.recipe.to_toml_dict(),
            "base_model": {"path": self.recipe.model.path, "fingerprint": self.loaded.model_fp},
            "tokenizer": {"fingerprint": self.loaded.tokenizer_fp},
            "step": state["step"],
            "total_steps": self.schedule.total_steps,
            "trained_tokens": state["trained_tokens"],
            "examples_seen": state["position"],
            "losses": {"train": state.get("last_train_loss"), "valid": state.get("last_valid_loss")},
            "processes": self.world.size,
            "switches": self.info.get("switches", {}),
        }

    def _writing(self, folder: Path):
        """A full disk or a read-only folder while writing a checkpoint or the adapter: an FtkitError that says so."""
        return ckpt.writing(folder, lambda: ckpt.checkpoint_bytes(self.run_dir, self.info.get("trainable_params", 0),
                                                                  self.recipe.train.optimizer))

    def _save_adapter_folder(self, dest: Path, state: dict[str, Any]) -> None:
        with atomic_dir(dest, self.world, self.backend.barrier) as tmp:
            self.backend.save_adapter(tmp)  # every process takes part (FSDP gathers the shards); the first writes
            if self.main:
                if self.recipe.method.kind == "full":
                    self.prep.tokenizer.save_pretrained(tmp)
                adapter_format.write_meta(tmp, self._meta(state))

    def _save_checkpoint(self, state: dict[str, Any]) -> Path:
        loss_sum, sums = self._check_finite(state)
        if self.window.steps:
            state["window"] = self.window.saved(loss_sum, sums)
        else:
            state.pop("window", None)
        dest = ckpt.checkpoint_dir(self.run_dir, state["step"])
        with self._writing(dest.parent), atomic_dir(dest, self.world, self.backend.barrier) as tmp:
            self._save_adapter_folder(tmp / "adapter", state)
            (tmp / "state").mkdir(exist_ok=True)
            self.backend.save_state(tmp / "state")  # each process its shard of the optimizer state
            self.backend.barrier()
            if self.main:
                write_json_atomic(tmp / ckpt.STATE_FILE, state)  # last: marks the folder complete
        self._saved_step = state["step"]
        if self.main:
            ckpt.prune(self.run_dir, self.recipe.train.keep_checkpoints)
        self.callbacks.on_save(state["step"], dest)
        return dest

    def run(self, resume: str | None = None, stop_after: int | None = None) -> StageResult:
        """Train the stage. `stop_after` ends this run after that step, with a checkpoint to resume from;
        so does SIGTERM, SIGINT or SIGUSR1 after the step it lands in (`interrupted` names it)."""
        ok = False
        with self.signals:
            try:
                state, resumed = self._setup(resume)
                self._steps(state, self.schedule.total_steps if stop_after is None else min(self.schedule.total_steps, stop_after))
                self._finish(state, stop_after)
                ok = True
            finally:
                self.callbacks.on_end(ok)  # the metrics log and the trackers, closed and flushed
        return StageResult(
            name=self.recipe.name or "stage", backend=self.backend.name, run_dir=self.run_dir, adapter=self.run_dir / "adapter",
            steps=state["step"], total_steps=self.schedule.total_steps, first_valid_loss=state.get("first_valid_loss"),
            last_valid_loss=state.get("last_valid_loss"), last_train_loss=state.get("last_train_loss"),
            trained_tokens=state["trained_tokens"], seconds=state["elapsed"],
            resumed_from=str(resumed) if resumed else None, info=self.info,
            interrupted=(self.signals.name or "a signal to another process") if self.stopped and state["step"] < self.schedule.total_steps else None,
        )

    def _setup(self, resume: str | None) -> tuple[dict[str, Any], Path | None]:
        """The run state (step 0 or a checkpoint's, which it also returns), the model on the backend,
        the run record, and the validation before training."""
        ckpt.check_writable(self.run_dir, resume)
        if self.main:
            ckpt.clean_partial(self.run_dir)
        resumed = prepare.find_resume(self.run_dir, resume)
        state = prepare.start_state(resumed, self.world)
        data_fp = prepare.data_fingerprint(self.prep.splits.train)
        note = prepare.check_resume(state, resumed, self.prep, data_fp) if resumed else None
        state["data_fingerprint"] = data_fp
        if resumed:
            self._saved_step = self._finite_step = state["step"]
        self.callbacks.on_start(state["step"], resumed is not None)
        self.loaded = prepare.load(self.prep, self.backend_name, resumed, self.start_adapter)
        self.backend, self.info = self.loaded.backend, self.loaded.backend.describe()
        if self.main:
            write_text_atomic(self.run_dir / "recipe.toml", self.recipe.to_toml())
            need = ckpt.checkpoint_bytes(self.run_dir, self.info.get("trainable_params", 0), self.recipe.train.optimizer)
            for warning in (note, ckpt.space_warning(self.run_dir, need, self.recipe.train.keep_checkpoints)):
                if warning:
                    console().print(warning, highlight=False)
        record = {"step": state["step"], "kind": "run", "backend": self.backend.name, "processes": self.world.size, **self.info}
        if self.main:  # only the first process writes the record: the machine is looked at once
            record["hardware"] = hardware_summary()
        self.meter = Meter.for_run(self.prep, self.backend, self.info, self.world.size, record.get("hardware"))  # FLOPs, the peak
        record.update(self.meter.run_fields())
        self.callbacks.on_run(record)
        self._say(prepare.banner(self.prep, self.backend.name, self.info, resumed, self.start_adapter))
        unused = prepare.other_backend_keys(self.recipe, self.backend.name)
        if unused:
            self._say(f"note: not used on {self.backend.name}: {unused}")
        if state["step"] == 0 and self.recipe.train.eval_before and self.prep.splits.valid:
            record = self._validate(state)
            state["first_valid_loss"] = record["loss"]
            self.callbacks.on_eval({"step": 0, "kind": "valid", **record})
        if state.pop("pending_eval", None) == state["step"] and self.prep.splits.valid:  # a signal cut it short
            self.callbacks.on_eval({"step": state["step"], "kind": "valid", **self._validate(state)})
        return state, resumed

    def _steps(self, state: dict[str, Any], end: int) -> None:
        """The optimizer steps up to `end`, each followed by the report, validation and checkpoint the schedule asks for."""
        sched, cb = self.schedule, self.callbacks
        t0 = time.perf_counter() - state["elapsed"]
        window = self.window = Window.restored(state.pop("window", None), self.main)
        cb.on_train_begin(state["step"])
        try:
            stop = self._stop_requested()  # a signal while the model loaded
            while state["step"] < end and not stop:
                lr, stats = self._step(state, window)
                step = state["step"]
                cb.on_step_end(step, lr)
                stop = self._stop_requested() and step < sched.total_steps  # the last step just finishes the run
                if sched.is_report(step):
                    cb.on_report(self._report(state, window, lr, stats, t0))
                if self.prep.splits.valid and sched.is_eval(step) and stop:
                    state["pending_eval"] = step  # the resumed run validates first: the checkpoint comes sooner
                elif self.prep.splits.valid and sched.is_eval(step):
                    t_eval = time.perf_counter()
                    record = self._validate(state)
                    window.t += time.perf_counter() - t_eval  # tokens/s counts training time only
                    cb.on_eval({"step": step, "kind": "valid", **record, "elapsed": time.perf_counter() - t0})
                state["elapsed"] = time.perf_counter() - t0
                if sched.is_save(step) or stop:
                    self._save_checkpoint(state)
        finally:
            cb.on_train_end(state["step"])

    def _stop_requested(self) -> bool:
        """Whether a signal asked the run to stop; in a multi-process run, whether it reached any process
        (one all-reduce of a flag per optimizer step), so that all of them save the same step together."""
        stop = self.signals.requested
        if self.world.size > 1:
            (count,) = self.backend.reduce_sum([1.0 if stop else 0.0])
            stop = count > 0
        self.stopped = self.stopped or stop
        return stop

    def _step(self, state: dict[str, Any], window: Window) -> tuple[float, dict[str, Any]]:
        """One optimizer step: each micro-batch weighted by the targets of the whole step, over all processes."""
        step = state["step"] + 1
        part = self._step_share(state["position"])
        lr = lr_at(step, self.recipe.train, self.schedule)
        before = window.loss, dict(window.sums)
        run = self.backend.pair_forward_backward if self.pref else self.backend.forward_backward
        for i in range(part.runs):  # losses stay on the device until the report
            last = i == part.runs - 1  # DDP / FSDP reduce the gradients once, after the last
            if i < len(part.batches):
                window.add_loss(run(part.batches[i], 1.0 / part.weight, sync=last))
            else:
                run(part.filler(), 0.0, sync=last)
        skip = self.recipe.train.on_nonfinite == "skip"
        stats = self.backend.optimizer_step(lr, skip_nonfinite=True) if skip else self.backend.optimizer_step(lr)
        # A skipped step still takes its examples (and its dropout draws): a resumed run moves on alike.
        state.update(step=step, position=state["position"] + self.schedule.examples_per_step)
        skipped = stats.pop("skipped", False)
        if skip:
            state["skipped_steps"] = state.get("skipped_steps", 0) + skipped
            state["skips_in_a_row"] = state.get("skips_in_a_row", 0) + 1 if skipped else 0
            if state["skips_in_a_row"] >= MAX_SKIPS_IN_A_ROW:
                raise nonfinite_error(step - MAX_SKIPS_IN_A_ROW + 1, step, f"{MAX_SKIPS_IN_A_ROW} steps in a row had non-finite "
                                      'gradients and were skipped (train.on_nonfinite = "skip")', self.recipe.train, self.run_dir)
        if skipped:
            window.loss, window.sums = before
        else:
            state["trained_tokens"] += part.targets
        self.meter.add(part)
        window.add(part, skipped)
        return lr, stats

    def _report(self, state: dict[str, Any], window: Window, lr: float, stats: dict[str, Any], t0: float) -> dict[str, Any]:
        """The training record of the window, which then restarts."""
        loss_sum, sums = self._window_loss(window, state["step"])
        now = time.perf_counter()
        if window.targets:  # none when every step of the window was skipped
            state["last_train_loss"] = loss_sum / window.targets
        record = {"step": state["step"], "kind": "train", "loss": loss_sum / window.targets if window.targets else None, "lr": lr,
                  "tokens_per_sec": window.tokens / max(1e-9, now - window.t),
                  **self.meter.report(window.tokens, now - window.t, self.backend.reduce_sum), "trained_tokens": state["trained_tokens"],
                  "elapsed": now - t0, **{k: value(v) for k, v in stats.items()},
                  **{k: v / window.targets for k, v in sums.items() if window.targets}}
        if self.recipe.train.on_nonfinite == "skip":
            record["skipped_steps"] = state.get("skipped_steps", 0)
        window.restart(now)
        return record

    def _validate(self, state: dict[str, Any]) -> dict[str, float]:
        """The validation record: the loss (and a preference objective's metrics) over the valid split."""
        args = (self.backend, self.prep.splits.valid, self.recipe.train.batch_size, self.pad_id, self.schedule.val_batches,
                self.world, self.packing)
        record = evaluate_pairs(*args, self.pref, self._valid_reference) if self.pref else {"loss": evaluate(*args)}
        state["last_valid_loss"] = record["loss"]
        return record

    def _finish(self, state: dict[str, Any], stop_after: int | None) -> None:
        """The final adapter once every step is done; a checkpoint to resume from when `stop_after` cut the run short."""
        if state["step"] >= self.schedule.total_steps:
            self._check_finite(state)
            state.pop("window", None)  # the last step always reports: nothing is left open
            with self._writing(self.run_dir):
                self._save_adapter_folder(self.run_dir / "adapter", state)
                if self.main:
                    write_json_atomic(self.run_dir / "final_state.json", state)
            self.callbacks.on_save(state["step"], self.run_dir / "adapter")
        elif stop_after is not None and self._saved_step != state["step"]:
            self._save_checkpoint(state)

    def _check_finite(self, state: dict[str, Any]) -> tuple[float, dict[str, float]]:
        """Before anything is written: the trainable tensors and the loss since the last report (returned), all finite."""
        step = state["step"]
        if not self.backend.trainable_finite():  # a step's loss predates its update: the weights are checked too
            raise nonfinite_error(self._finite_step + 1, step, f"the trainable weights hold NaN or inf after step {step}",
                                  self.recipe.train, self.run_dir)
        sums = self._window_loss(self.window, step) if self.window.steps else (0.0, {})
        self._finite_step = step
        return sums

    def _window_loss(self, window: Window, step: int) -> tuple[float, dict[str, float]]:
        """The summed training loss (and preference metrics) since the last report, over all processes; an error if
        the loss is not finite."""
        names = sorted(window.sums)
        loss_sum, *rest = self.backend.reduce_sum([value(window.loss), *(value(window.sums[k]) for k in names)])
        if not math.isfinite(loss_sum):
            raise nonfinite_error(step - window.steps + 1, step, f"the loss is {loss_sum}", self.recipe.train, self.run_dir)
        return loss_sum, dict(zip(names, rest))

    def _step_share(self, position: int) -> batching.Share:
        train, ex = self.recipe.train, self.prep.splits.train
        if train.group_by_length and self._lengths is None:
            self._lengths = ex.lengths() if hasattr(ex, "lengths") else [len(e.ids) for e in ex]  # cached splits know them
        lengths = self._lengths if train.group_by_length else None
        idx = batching.step_indices(len(ex), train.seed, position, self.schedule.examples_per_step, lengths)
        return batching.share([ex[i] for i in idx], train.batch_size, self.pad_id, self.packing, self.world)
