"""The one training loop, shared by every backend.

The loop decides what data each step sees, how micro-batches are weighted, the learning rate, when to
report, validate and checkpoint, and how a run resumes. A backend only does the tensor math.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.adapters import init
from ftkit.adapters import meta as adapter_format
from ftkit.adapters import resolve as adapter_layout
from ftkit.backend.registry import get_backend
from ftkit.common.atomic import atomic_dir, write_json_atomic, write_text_atomic
from ftkit.common.console import console, status
from ftkit.common.errors import FtkitError
from ftkit.common.fingerprints import fingerprint_model, fingerprint_tokenizer
from ftkit.data import batching
from ftkit.train import checkpoint as ckpt
from ftkit.train.metrics import MetricsLog, plot_losses
from ftkit.train.prepare import Prepared
from ftkit.train.progress import TrainProgress
from ftkit.train.schedule import lr_at
from ftkit.train.tracking import for_recipe
from ftkit.train.validate import evaluate, value


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

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["run_dir"], d["adapter"] = str(self.run_dir), str(self.adapter)
        return d


class Trainer:
    def __init__(self, prep: Prepared, backend_name: str, *, start_adapter: Path | None = None, quiet: bool = False):
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
        self._lengths: list[int] | None = None

        self.log = MetricsLog(self.run_dir, enabled=self.main, trackers=for_recipe(self.recipe, self.run_dir) if self.main else None)

    def _say(self, msg: str) -> None:
        if not self.quiet:
            console().print(msg)

    def _meta(self, state: dict[str, Any]) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "method": self.recipe.method.kind,
            "recipe": self.recipe.to_toml_dict(),
            "base_model": {"path": self.recipe.model.path, "fingerprint": self.model_fp},
            "tokenizer": {"fingerprint": self.tokenizer_fp},
            "step": state["step"],
            "total_steps": self.schedule.total_steps,
            "trained_tokens": state["trained_tokens"],
            "examples_seen": state["position"],
            "losses": {"train": state.get("last_train_loss"), "valid": state.get("last_valid_loss")},
            "processes": self.world.size,
            "switches": self.info.get("switches", {}),
        }

    def _save_adapter_folder(self, dest: Path, state: dict[str, Any]) -> None:
        with atomic_dir(dest, self.world, self.backend.barrier) as tmp:
            self.backend.save_adapter(tmp)  # every process takes part (FSDP gathers the shards); the first writes
            if self.main:
                if self.recipe.method.kind == "full":
                    self.prep.tokenizer.save_pretrained(tmp)
                adapter_format.write_meta(tmp, self._meta(state))

    def _save_checkpoint(self, state: dict[str, Any]) -> Path:
        dest = ckpt.checkpoint_dir(self.run_dir, state["step"])
        with atomic_dir(dest, self.world, self.backend.barrier) as tmp:
            self._save_adapter_folder(tmp / "adapter", state)
            (tmp / "state").mkdir(exist_ok=True)
            self.backend.save_state(tmp / "state")  # each process its shard of the optimizer state
            self.backend.barrier()
            if self.main:
                write_json_atomic(tmp / ckpt.STATE_FILE, state)  # last: marks the folder complete
        if self.main:
            ckpt.prune(self.run_dir, self.recipe.train.keep_checkpoints)
        return dest

    def run(self, resume: str | None = None, stop_after: int | None = None) -> StageResult:
        """Train the stage. `stop_after` ends this run after that step, with a checkpoint to resume from."""
        recipe, sched, splits = self.recipe, self.schedule, self.prep.splits
        if self.main:
            ckpt.clean_partial(self.run_dir)
        resume_ckpt = self._find_resume(resume)
        state = {"step": 0, "position": 0, "trained_tokens": 0, "elapsed": 0.0, "first_valid_loss": None,
                 "processes": self.world.size}
        if resume_ckpt is not None:
            state = ckpt.read_state(resume_ckpt)
            saved_by = state.get("processes", 1)
            if saved_by != self.world.size:
                # A step is batch_size * grad_accum examples per process: another count is another schedule.
                raise FtkitError(f"{resume_ckpt} was written by a run of {saved_by} process(es); resume it with {saved_by} "
                                 f"(this run has {self.world.size}), or start a new run from its adapter with method.resume_from.")
            self.log.truncate_after(state["step"])
        else:
            self.log.clear()  # what a run killed before its first checkpoint logged is trained again
        self.model_fp = fingerprint_model(self.prep.model_path)
        self.tokenizer_fp = fingerprint_tokenizer(self.prep.tokenizer)
        load_from = resume_ckpt / "adapter" if resume_ckpt else self.start_adapter
        if load_from is not None and recipe.method.kind != "full":
            adapter_format.check_compatible(load_from, self.model_fp, self.tokenizer_fp)
            adapter_format.check_method(load_from, recipe.method.kind, recipe.method.rank, recipe.method.num_virtual_tokens)

        self.backend = get_backend(self.backend_name)
        model_path = self.prep.model_path
        if recipe.method.kind == "full" and load_from is not None:
            model_path, load_from = load_from, None
        with status(f"loading {self.prep.model_path.name} on {self.backend.name}"):
            self.backend.load(recipe, model_path, adapter=load_from, train=True)
        if resume_ckpt is None and load_from is None and recipe.is_adapter:
            self._draw_initial_adapter()
        self.backend.start_training()  # wraps for DDP/FSDP once the starting values are in place
        if resume_ckpt is not None:
            self.backend.load_state(resume_ckpt / "state")
        info = self.backend.describe()
        if self.main:
            self._write_recipe()
        self.info = info
        self.log.log({"step": state["step"], "kind": "run", "backend": self.backend.name, "processes": self.world.size, **info})
        self._say(self._banner(info, resume_ckpt))
        unused = self._other_backend_keys()
        if unused:
            self._say(f"note: not used on {self.backend.name}: {unused}")

        if state["step"] == 0 and recipe.train.eval_before and splits.valid:
            loss = evaluate(self.backend, splits.valid, recipe.train.batch_size, self.pad_id, sched.val_batches, self.world,
                            self.packing)
            state["first_valid_loss"] = state["last_valid_loss"] = loss
            self.log.log({"step": 0, "kind": "valid", "loss": loss})
            self._say(f"step 0: validation loss {loss:.4f}")

        t0 = time.perf_counter() - state["elapsed"]
        window = {"loss": 0.0, "targets": 0, "tokens": 0, "steps": 0, "t": time.perf_counter()}
        end = sched.total_steps if stop_after is None else min(sched.total_steps, stop_after)
        with TrainProgress(sched.total_steps, start=state["step"], enabled=not self.quiet) as bar:
            while state["step"] < end:
                step = state["step"] + 1
                part = self._step_share(state["position"])
                lr = lr_at(step, recipe.train, sched)
                for i in range(part.runs):  # losses stay on the device until the report
                    last = i == part.runs - 1  # DDP / FSDP reduce the gradients once, after the last
                    if i < len(part.batches):
                        window["loss"] += self.backend.forward_backward(part.batches[i], 1.0 / part.targets, sync=last)
                    else:
                        self.backend.forward_backward(part.filler(), 0.0, sync=last)
                stats = self.backend.optimizer_step(lr)
                state.update(step=step, position=state["position"] + sched.examples_per_step)
                state["trained_tokens"] += part.targets
                window["targets"] += part.targets
                window["tokens"] += part.tokens
                window["steps"] += 1

                if sched.is_report(step):
                    loss_sum = self._window_loss(window, step)
                    now = time.perf_counter()
                    train_loss = loss_sum / window["targets"]
                    tps = window["tokens"] / max(1e-9, now - window["t"])
                    state["last_train_loss"] = train_loss
                    rec = {"step": step, "kind": "train", "loss": train_loss, "lr": lr, "tokens_per_sec": tps,
                           "trained_tokens": state["trained_tokens"], "elapsed": now - t0,
                           **{k: value(v) for k, v in stats.items()}}
                    self.log.log(rec)
                    bar.update(step, loss=train_loss, lr=lr, tokens_per_sec=tps)
                    window = {"loss": 0.0, "targets": 0, "tokens": 0, "steps": 0, "t": now}
                else:
                    bar.update(step, lr=lr)
                if splits.valid and sched.is_eval(step):
                    t_eval = time.perf_counter()
                    loss = evaluate(self.backend, splits.valid, recipe.train.batch_size, self.pad_id, sched.val_batches, self.world,
                            self.packing)
                    window["t"] += time.perf_counter() - t_eval  # tokens/s counts training time only
                    state["last_valid_loss"] = loss
                    self.log.log({"step": step, "kind": "valid", "loss": loss, "elapsed": time.perf_counter() - t0})
                    bar.log(f"step {step}: validation loss {loss:.4f}")
                state["elapsed"] = time.perf_counter() - t0
                if sched.is_save(step):
                    if window["steps"]:  # never a checkpoint of weights a NaN has reached (a report just checked)
                        self._window_loss(window, step)
                    self._save_checkpoint(state)

        final = self.run_dir / "adapter"
        if state["step"] >= sched.total_steps:
            self._save_adapter_folder(final, state)
            if self.main:
                write_json_atomic(self.run_dir / "final_state.json", state)
        elif stop_after is not None:
            self._save_checkpoint(state)
        if self.main:
            plot_losses(self.log.path, self.run_dir / "loss.png", title=f"{recipe.name} ({self.backend.name})")
        self.log.close()
        return StageResult(
            name=recipe.name or "stage", backend=self.backend.name, run_dir=self.run_dir, adapter=final,
            steps=state["step"], total_steps=sched.total_steps, first_valid_loss=state.get("first_valid_loss"),
            last_valid_loss=state.get("last_valid_loss"), last_train_loss=state.get("last_train_loss"),
            trained_tokens=state["trained_tokens"], seconds=state["elapsed"],
            resumed_from=str(resume_ckpt) if resume_ckpt else None, info=info,
        )

    def _draw_initial_adapter(self) -> None:
        """Same recipe and seed, same starting adapter, whichever backend trains it."""
        method, seed = self.recipe.method, self.recipe.train.seed
        rows = lambda: self.backend.embedding_rows(init.prompt_init_ids(method, self.prep.tokenizer, seed))  # noqa: E731
        self.backend.set_adapter_tensors(init.draw(self.backend.adapter_tensors(), seed, rows if method.kind == "prompt" else None))

    def _window_loss(self, window: dict[str, Any], step: int) -> float:
        """The summed training loss since the last report, over all processes; an error if it is not finite."""
        (loss_sum,) = self.backend.reduce_sum([value(window["loss"])])
        if not math.isfinite(loss_sum):
            first = step - window["steps"] + 1
            raise FtkitError(f"steps {first}-{step}: the loss is {loss_sum}; lower train.lr or check the data. "
                             "The checkpoints in the run folder are from before.")
        return loss_sum

    def _step_share(self, position: int) -> batching.Share:
        train, ex = self.recipe.train, self.prep.splits.train
        if train.group_by_length and self._lengths is None:
            self._lengths = ex.lengths() if hasattr(ex, "lengths") else [len(e.ids) for e in ex]  # cached splits know them
        lengths = self._lengths if train.group_by_length else None
        idx = batching.step_indices(len(ex), train.seed, position, self.schedule.examples_per_step, lengths)
        return batching.share([ex[i] for i in idx], train.batch_size, self.pad_id, self.packing, self.world)

    def _find_resume(self, resume: str | None) -> Path | None:
        existing = ckpt.latest_checkpoint(self.run_dir)
        if resume is None:
            if existing is not None or (self.run_dir / "adapter").exists():
                raise FtkitError(
                    f"{self.run_dir} already holds a run (checkpoints or a final adapter). Pass --resume auto to "
                    "continue it, or set output.dir (--set output.dir=...) to start a new one; nothing was overwritten."
                )
            return None
        if resume == "auto":
            return existing
        path = Path(resume)
        if (path / ckpt.STATE_FILE).is_file():
            return path
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise FtkitError(f"--resume {resume}: no complete checkpoint there (a folder with {ckpt.STATE_FILE}).")
        return found

    def _other_backend_keys(self) -> str:
        """Non-default keys of the other backend's section: kept in the recipe (the same file runs on
        both machines) but said out loud, never silently dropped."""
        other = "mlx" if self.backend.name == "torch" else "torch"
        section = getattr(self.recipe, other)
        defaults = type(section)()
        return ", ".join(f"{other}.{k} = {v!r}" for k, v in section if v != getattr(defaults, k))

    def _write_recipe(self) -> None:
        write_text_atomic(self.run_dir / "recipe.toml", self.recipe.to_toml())

    def _banner(self, info: dict[str, Any], resumed: Path | None) -> str:
        s, r = self.schedule, self.recipe
        trainable, total = info.get("trainable_params", 0), info.get("total_params", 0)
        pct = 100 * trainable / total if total else 0
        procs = f" ({self.world.size} processes x {r.train.batch_size * r.train.grad_accum})" if self.world.size > 1 else ""
        lines = [
            f"[bold]{r.name}[/]: {r.method.kind} on {info.get('device')} ({self.backend.name}, {info.get('dtype')}, precision {info.get('precision')})",
            f"trainable parameters: {trainable:,} of {total:,} ({pct:.3f}%)",
            f"data: {len(self.prep.splits.train)} train / {len(self.prep.splits.valid)} valid / {len(self.prep.splits.test)} test examples ({self.prep.splits.format}, loss on {self.prep.splits.train_on})",
            f"schedule: {s.total_steps} steps x {s.examples_per_step} examples{procs}, validate every {s.steps_per_eval}, report every {s.steps_per_report}, checkpoint every {s.save_every}",
        ]
        if info.get("switches"):
            lines.append("switches: " + ", ".join(f"{k} {v}" for k, v in info["switches"].items()))
        if resumed:
            lines.append(f"resumed from {resumed}")
        return "\n".join(lines)
