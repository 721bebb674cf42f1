"""Loss, perplexity and task metrics of a base model, or a base plus an adapter, on a data split; and
the before/after comparison of the two that `ftkit eval` prints and saves."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

from ftkit.backend.protocol import Backend
from ftkit.common.atomic import write_text_atomic
from ftkit.common.console import status
from ftkit.common.errors import FtkitError
from ftkit.data.mapping import read_rows
from ftkit.evaluate.inference import load_for_inference
from ftkit.evaluate.preference import preference_scores
from ftkit.evaluate.tasks import Scorer, run_task
from ftkit.recipe.schema import Recipe
from ftkit.recipe.tasks import task_names, tasks_of
from ftkit.train.prepare import prepare
from ftkit.train.validate import evaluate

PREFERENCE_KEYS = ("preference_accuracy", "preference_accuracy_per_token", "logps_chosen", "logps_rejected", "margin")


def _task_rows(recipe: Recipe, split: str) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """The split's mapped rows per task, and each task's label set as the data has it (all splits)."""

    main = task_names(recipe)[0]
    per_split = read_rows(recipe.data)
    by_task: dict[str, list[dict]] = {}
    labels: dict[str, set[str]] = {}
    for name, rows in per_split.items():
        for row in rows:
            task = row.get("_task") or main
            if name == split:
                by_task.setdefault(task, []).append(row)
            if isinstance(row.get("_gold"), str):
                labels.setdefault(task, set()).add(row["_gold"])
    return by_task, {k: sorted(v) for k, v in labels.items()}


def _sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or len(rows) <= n:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def score_tasks(recipe: Recipe, backend: Backend, tokenizer, fmt: str, split: str,
                rows: tuple[dict, dict] | None = None) -> dict[str, dict[str, Any]]:
    """Each configured task's metrics on the split, for a loaded backend."""

    tasks = [t for t in tasks_of(recipe) if t.kind != "none"]
    if not tasks:
        return {}
    by_task, labels = rows if rows is not None else _task_rows(recipe, split)
    out = {}
    for task in tasks:
        chosen = _sample(by_task.get(task.name, []), task.settings.max_examples, recipe.eval.seed)
        with status(f"{task.name}: {task.kind} on {len(chosen)} {split} examples ({backend.name})"):
            scorer = Scorer(backend, tokenizer, recipe.data, fmt)  # encoded as training encodes them: with [data]'s keys
            out[task.name] = run_task(scorer, task, chosen, labels.get(task.name), recipe.eval.top_confusions,
                                      f"{task.name} {split}")
    return out


def _run_folder(recipe: Recipe, adapter: Path | None) -> Path:
    if adapter is not None and adapter.name == "adapter":
        return adapter.parent
    return Path(recipe.output.dir)


def evaluate_recipe(recipe: Recipe, backend_name: str, adapter: Path | None, split: str | None = None,
                    compare: bool | None = None, out: Path | None = None) -> dict[str, Any]:
    """Loss, perplexity and the [eval] tasks' metrics; with an adapter and tasks (or compare=True), the
    base model too, as a before/after table. Saved as JSON in the run folder (or `out`)."""

    split = split or recipe.eval.split
    if out is not None:
        writable(Path(out), "--out")  # before the evaluation, not after it
    prep = prepare(recipe)
    examples = getattr(prep.splits, split)
    if not examples:
        raise FtkitError(
            f"{recipe.data.path}: the {split} split is empty. Add a {split} file to the data folder, or set "
            f"data.{split}_fraction to hold out part of the training data."
        )
    pairs = prep.splits.format == "preference"
    has_tasks = not pairs and any(t.kind != "none" for t in tasks_of(recipe))
    compare = (adapter is not None and (has_tasks or pairs)) if compare is None else (compare and adapter is not None)
    rows = _task_rows(recipe, split) if has_tasks else None
    runs = ([("base", None)] if compare else []) + [("adapter" if adapter is not None else "base", adapter)]
    results: dict[str, dict[str, Any]] = {}
    for label, which in runs:
        backend = load_for_inference(recipe, backend_name, which, prep.model_path, prep.tokenizer)
        if pairs:
            scores = preference_scores(backend, examples, recipe.train.batch_size, prep.tokenizer.pad_token_id, recipe.packs)
        else:
            loss = evaluate(backend, examples, recipe.train.batch_size, prep.tokenizer.pad_token_id, packing=recipe.packs)
            scores = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}
        results[label] = {
            **scores, "tasks": score_tasks(recipe, backend, prep.tokenizer, prep.splits.format, split, rows) if has_tasks else {},
            "backend": backend.name, "adapter": str(which) if which else None,
        }
        del backend
    last = results[runs[-1][0]]
    seqs = [s for p in examples for s in (p.chosen, p.rejected)] if pairs else examples
    result = {
        "split": split, "examples": len(examples), "target_tokens": sum(sum(e.mask[1:]) for e in seqs),
        **{k: last[k] for k in ("loss", "perplexity", "backend", "adapter", "tasks", *PREFERENCE_KEYS) if k in last},
    }
    if compare:
        result["before"], result["after"] = results["base"], results["adapter"]
    if has_tasks or pairs or compare or out is not None:
        dest = Path(out) if out is not None else _run_folder(recipe, adapter) / f"eval-{split}.json"
        try:
            write_text_atomic(dest, json.dumps(_finite(result), indent=2) + "\n")
        except OSError as e:
            flag = "--out " if out is not None else ""
            raise FtkitError(f"{flag}{dest}: cannot write the result there ({e.strerror or e}); "
                             f"{'choose a writable --out' if out is not None else 'pass --out FILE in a writable folder'}.") from None
        result["saved"] = str(dest)
    return result


def writable(dest: Path, flag: str) -> None:
    """Refuse, naming `flag` and the file, a place a result cannot be written to (a read-only or full
    disk, a path under a file), by writing a probe beside it."""
    dest = Path(dest)
    blocker = next((a for a in dest.parents if a.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise FtkitError(f"{flag} {dest}: {blocker} is a file, not a folder; choose another place.")
    probe = dest.parent / f".{dest.name}.probe-{os.getpid()}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FtkitError(f"{flag} {dest}: cannot write there ({e.strerror or e}); choose a writable place.") from None


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def comparison_rows(result: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(metric, before, after) rows of the table `ftkit eval` prints; before is None without a base run."""
    before = result.get("before")
    after = result.get("after") or result
    rows: list[tuple[str, Any, Any]] = [("loss", before and before["loss"], after["loss"]),
                                        ("perplexity", before and before["perplexity"], after["perplexity"])]
    for key in PREFERENCE_KEYS:
        if key in after:
            rows.append((key.replace("_", " "), before and before[key], after[key]))
    for name, m in after.get("tasks", {}).items():
        b = (before or {}).get("tasks", {}).get(name, {})
        for key in ("accuracy", "macro_f1", "exact_match", "normalized_exact_match", "unmatched"):
            if key in m:
                rows.append((f"{name} {key.replace('_', ' ')}", b.get(key), m[key]))
    return rows
