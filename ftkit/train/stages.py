"""Several recipes as stages, each starting from the adapter the one before wrote; finished stages are skipped."""

from __future__ import annotations

import json
from pathlib import Path

from ftkit.adapters import meta as adapter_format
from ftkit.recipe.schema import Recipe
from ftkit.train.loop import StageResult, Trainer
from ftkit.train.prepare import prepare


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


def run_stages(recipes: list[Recipe], backend: str, resume: str | None = None, quiet: bool = False,
               stop_after: int | None = None) -> list[StageResult]:
    """Train the stages in order, each from the adapter the one before produced.

    `stop_after` stops the stage being trained after that step (a planned preemption: a time-limited
    job slot); `--resume auto` carries on from there.
    """
    results: list[StageResult] = []
    previous: Path | None = None
    for recipe, run_dir in zip(recipes, stage_dirs(recipes)):
        if previous is not None and recipe.method.resume_from is None:
            if recipe.method.kind == "full":
                recipe.model.path = str(previous)  # a full fine-tune hands on a whole model
            else:
                recipe.method.resume_from = str(previous)
        done = finished_stage(run_dir, recipe, backend) if resume else None
        if done is None:
            trainer = Trainer(prepare(recipe, run_dir), backend, quiet=quiet)
            done = trainer.run(resume=resume, stop_after=stop_after)
            if done.steps < done.total_steps:
                return results + [done]
        results.append(done)
        previous = done.adapter
    return results
