"""Several recipes as stages, each starting from the adapter the one before wrote; finished stages are skipped,
or continued where the recipe now asks for more steps."""

from __future__ import annotations

import json
from pathlib import Path

from ftkit.adapters import meta as adapter_format
from ftkit.common.console import console
from ftkit.common.distributed import current
from ftkit.common.errors import FtkitError
from ftkit.recipe.schema import Recipe
from ftkit.train import checkpoint as ckpt
from ftkit.train.interrupt import EXIT_RESUME, Interrupted, tell_launcher
from ftkit.train.loop import StageResult, Trainer
from ftkit.train.prepare import Prepared, check_resume_word, prepare


def stage_dirs(recipes: list[Recipe]) -> list[Path]:
    """Each stage's run folder: output.dir, or a numbered subfolder where stages share one."""
    dirs = [Path(r.output.dir) for r in recipes]
    if len(set(dirs)) == len(dirs):
        return dirs
    return [d / f"stage-{i + 1}-{r.name}" if dirs.count(d) > 1 else d for i, (d, r) in enumerate(zip(dirs, recipes))]


def finished_stage(run_dir: Path, recipe: Recipe, backend: str) -> StageResult | None:
    """A stage whose final adapter is in place, read back instead of retrained on --resume."""
    final = run_dir / "final_state.json"
    meta = adapter_format.read_meta(run_dir / "adapter")
    if not final.exists() or meta is None:
        return None
    state = json.loads(final.read_text())
    return StageResult(
        name=recipe.name or "stage", backend=meta.get("backend", backend), run_dir=run_dir, adapter=run_dir / "adapter",
        steps=state["step"], total_steps=state["step"], first_valid_loss=state.get("first_valid_loss"), last_valid_loss=state.get("last_valid_loss"),
        last_train_loss=state.get("last_train_loss"), trained_tokens=state["trained_tokens"], seconds=state["elapsed"],
        resumed_from="finished earlier",
    )


def continue_finished(done: StageResult, prep: Prepared) -> str:
    """A finished run whose recipe now asks for more steps (a larger train.iters or epochs) goes on from its
    newest checkpoint to the new end; the learning-rate schedule is recomputed for the new total."""
    total, latest = prep.schedule.total_steps, ckpt.latest_checkpoint(done.run_dir)
    if latest is None:
        raise FtkitError(f"{done.run_dir} finished at step {done.steps}; the recipe now asks for {total} steps, but the run folder "
                         "holds no checkpoint to go on from (the run saved none before its end). Start a new run from its "
                         f"adapter: --set method.resume_from={done.adapter} --set output.dir=NEW_FOLDER.")
    step = ckpt.read_state(latest)["step"]
    again = f"; steps {step + 1}-{done.steps} are trained again" if step < done.steps else ""
    return (f"{done.run_dir} finished at step {done.steps}; going on to {total} steps from {latest.name} "
            f"(the learning-rate schedule is recomputed for {total} steps{again})")


def run_stages(recipes: list[Recipe], backend: str, resume: str | None = None, quiet: bool = False,
               stop_after: int | None = None) -> list[StageResult]:
    """Train the stages in order, each from the adapter the one before produced.

    `stop_after` stops the stage being trained after that step (a planned preemption: a time-limited
    job slot); `--resume auto` carries on from there. A signal (SIGTERM, SIGINT, SIGUSR1) does the same
    after the step it lands in, and then raises Interrupted: the process exits with EXIT_RESUME (75).
    """
    check_resume_word(resume)
    results: list[StageResult] = []
    previous: Path | None = None
    for recipe, run_dir in zip(recipes, stage_dirs(recipes)):
        if previous is not None and recipe.method.resume_from is None:
            if recipe.method.kind == "full":
                recipe.model.path = str(previous)  # a full fine-tune hands on a whole model
            else:
                recipe.method.resume_from = str(previous)
        done = finished_stage(run_dir, recipe, backend) if resume else None
        prep = None
        if done is not None:
            prep = prepare(recipe, run_dir)
            if prep.schedule.total_steps > done.steps:
                note = continue_finished(done, prep)
                if current().is_main and not quiet:
                    console().print(f"note: {note}", highlight=False)
                done = None
        if done is None:
            trainer = Trainer(prep or prepare(recipe, run_dir), backend, quiet=quiet)
            done = trainer.run(resume=resume, stop_after=stop_after)
            if done.interrupted:
                message = (f"stopped by {done.interrupted} after step {done.steps} of {done.total_steps}, with a checkpoint in "
                           f"{done.run_dir / 'checkpoints'}: --resume auto goes on from it (exit {EXIT_RESUME})")
                if current().is_main:
                    console().print(f"[yellow]{message}[/]", highlight=False)
                tell_launcher()
                raise Interrupted(message)
            if done.steps < done.total_steps:
                return results + [done]
        results.append(done)
        previous = done.adapter
    return results
