"""The tasks of a recipe (data and each [[data.mix]] source) and their [eval] settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftkit.recipe.schema import EvalTask, MappingFields

if TYPE_CHECKING:
    from ftkit.recipe.schema import DataSection, MixSource, Recipe


def source_section(data: "DataSection", source: "MixSource") -> "DataSection":
    """The [data] section as it applies to one [[data.mix]] source: its mapping keys are its own (data's
    templates describe data's columns), the rest (max_seq_length, format, chat_format ...) come from data
    unless the source sets them."""

    mapping = {k: getattr(source, k) for k in MappingFields.model_fields}
    mapping["max_rows"] = source.max_rows or data.max_rows  # a sample size is no column's: [data]'s holds for all
    own = {k: v for k, v in source.model_dump(exclude={"name"}).items() if v is not None and k not in mapping}
    return data.model_copy(update={**own, **mapping, "mix": [], "name": source.name})


def task_names(recipe: "Recipe") -> list[str]:
    return [recipe.data.name or recipe.name or "data"] + [m.name for m in recipe.data.mix]


def task_settings(r: "Recipe", name: str):
    """[eval]'s keys, with [eval.tasks.NAME]'s set ones over them."""

    base = {k: getattr(r.eval, k) for k in EvalTask.model_fields}
    if name in r.eval.tasks:
        base.update({k: v for k, v in r.eval.tasks[name].model_dump().items() if v is not None})
    return EvalTask(**base)


def task_kind(r: "Recipe", name: str, spec: "DataSection") -> str:
    kind = task_settings(r, name).task
    if kind != "auto":
        return kind
    if spec.choices_field and spec.answer_field:
        return "multiple_choice"
    if spec.label_field:
        return "classification"
    return "generation"


@dataclass
class TaskSpec:
    name: str
    kind: str  # classification | multiple_choice | generation | none
    spec: Any  # the source's DataSection (source_section for a mix source)
    settings: Any  # its EvalTask


def tasks_of(r: "Recipe") -> list[TaskSpec]:
    specs = [r.data] + [source_section(r.data, m) for m in r.data.mix]
    return [TaskSpec(name, task_kind(r, name, spec), spec, task_settings(r, name)) for name, spec in zip(task_names(r), specs)]
