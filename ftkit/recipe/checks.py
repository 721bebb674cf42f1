"""Combinations of recipe keys that are wrong together, found before any data or model is read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ftkit.common.hub import looks_like_hub_id
from ftkit.common.suggest import did_you_mean, missing_path
from ftkit.recipe.tasks import task_names, task_settings

if TYPE_CHECKING:
    from ftkit.recipe.schema import Recipe


def _check_combinations(r: Recipe, where: str) -> list[str]:
    errors = []
    if r.train.iters is not None and r.train.epochs is not None:
        errors.append(f"{where}: train.iters = {r.train.iters} and train.epochs = {r.train.epochs:g} are both set, but a run has "
                      "one length; keep one (iters: optimizer steps; epochs: passes over the training data).")
    if r.data.train_on == "completion" and r.data.format == "text" and not r.data.response_template:
        errors.append(
            f"{where}: data.train_on = 'completion' with text data needs data.response_template "
            "(the marker after which the completion starts), or set data.train_on = 'all'."
        )
    if r.data.packing == "on" and r.method.kind in ("prompt", "prefix"):
        errors.append(f"{where}: data.packing = 'on' cannot pack {r.method.kind} tuning: its virtual tokens start every "
                      "example's row. Set data.packing = 'auto' or 'off'.")
    errors += _objective_problems(r, where)
    if r.method.kind == "full" and r.model.quantize != "none":
        errors.append(f"{where}: method.kind = 'full' cannot train a quantized base (model.quantize = '{r.model.quantize}').")
    if r.method.kind == "full" and r.method.resume_from:
        errors.append(f"{where}: method.resume_from is for adapters; for full fine-tuning point model.path at the model folder.")
    model_path = Path(r.model.path)
    if not model_path.exists() and not looks_like_hub_id(r.model.path):
        errors.append(f"{where}: model.path: {r.model.path} does not exist: no such file or folder "
                      f"(a local folder, a .gguf file, or a hub id 'org/name').{missing_path(r.model.path)}")
    data_path = Path(r.data.path)
    if not data_path.exists() and not looks_like_hub_id(r.data.path):
        errors.append(f"{where}: data.path: {r.data.path} does not exist: no such file or folder "
                      f"(a folder, a .jsonl/.csv/.parquet file, or a hub id 'org/name').{missing_path(r.data.path)}")
    if r.method.resume_from and not Path(r.method.resume_from).exists() and not looks_like_hub_id(r.method.resume_from):
        errors.append(f"{where}: method.resume_from: {r.method.resume_from} does not exist: no such adapter folder."
                      f"{missing_path(r.method.resume_from)}")

    errors += recipe_problems(r, where)
    return errors


def _objective_problems(r: "Recipe", where: str) -> list[str]:
    """train.objective against data.format (when the recipe names it; auto-detected data is checked once read,
    ftkit.data.preference.check_objective) and against method.kind."""
    errors, objective, fmt = [], r.train.objective, r.data.format
    if objective in ("dpo", "orpo") and fmt not in ("auto", "preference"):
        errors.append(f"{where}: train.objective = '{objective}' trains on preference pairs, but data.format = '{fmt}'. Set "
                      "data.format = 'preference' (rows with a prompt or messages, a chosen and a rejected response), or "
                      "train.objective = 'sft'.")
    if objective == "sft" and fmt == "preference":
        errors.append(f"{where}: data.format = 'preference' holds pairs for train.objective = 'dpo' or 'orpo', but "
                      "train.objective = 'sft'. Set train.objective, or data.format to read the rows as SFT data.")
    if objective in ("dpo", "orpo") and r.method.kind in ("prompt", "prefix"):
        errors.append(f"{where}: train.objective = '{objective}' with method.kind = '{r.method.kind}' is not supported: "
                      "a preference batch lays out two sequences a pair (several to a row when packed) and scores them with "
                      "the adapter on and off, and virtual tokens have no place in that layout. Use method.kind = 'lora', "
                      "'dora' or 'full'.")
    if fmt == "preference" and r.data.train_on == "all":
        errors.append(f"{where}: data.train_on = 'all' with preference data: DPO and ORPO compare the responses' "
                      "log-probabilities, the prompt is never a target. Remove data.train_on.")
    return errors


def recipe_problems(r: "Recipe", where: str) -> list[str]:
    """What the mapping and [eval] keys get wrong, found before any data is read."""

    errors = []
    d = r.data
    specs = [("data", d)] + [(f"data.mix[{i}] ({m.name})", m) for i, m in enumerate(d.mix)]
    for label, spec in specs:
        if spec.loom and not Path(spec.loom).is_file():
            errors.append(f"{where}: {label}.loom: {spec.loom} does not exist.")
        if isinstance(spec.label_names, str) and not Path(spec.label_names).is_file():
            errors.append(f"{where}: {label}.label_names: {spec.label_names} does not exist (a JSON list or one name per line).")
        if spec.answer_field and not spec.choices_field:
            errors.append(f"{where}: {label}.answer_field needs {label}.choices_field (the column with the choices).")
        if spec.loom and spec.prompt_template:
            errors.append(f"{where}: {label}: loom and prompt_template both build the prompt; keep one.")
    for i, m in enumerate(d.mix):
        if not Path(m.path).exists() and not looks_like_hub_id(m.path):
            errors.append(f"{where}: data.mix[{i}] ({m.name}).path: {m.path} does not exist: no such file or folder "
                          f"(a folder, a file, or a hub id).{missing_path(m.path)}")
    names = task_names(r)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        errors.append(f"{where}: task names must differ: {', '.join(dupes)} (data.name and each data.mix name).")
    for name, task in r.eval.tasks.items():
        if name not in names:
            errors.append(f"{where}: eval.tasks.{name}: no such task; the tasks are {', '.join(names)}.{did_you_mean(name, names)}")
    for name, spec in zip(names, [d] + list(d.mix)):
        kind = task_settings(r, name).task
        if kind == "classification" and not spec.label_field:
            errors.append(f"{where}: task {name}: eval task 'classification' needs data.label_field (the column with the class label).")
        if kind == "multiple_choice" and not (spec.choices_field and spec.answer_field):
            errors.append(f"{where}: task {name}: eval task 'multiple_choice' needs data.choices_field and data.answer_field.")
    return errors
