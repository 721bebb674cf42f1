"""Everything a run needs before its first step: the backend, the model, the tokenizer, the data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.common import distributed
from ftkit.common.console import status
from ftkit.common.distributed import World
from ftkit.common.errors import FtkitError
from ftkit.data.batch import Splits
from ftkit.data.token_cache import load_splits
from ftkit.models.resolve import resolve_model
from ftkit.models.tokenizer import load_tokenizer
from ftkit.recipe.schema import Recipe
from ftkit.train.schedule import Schedule, make_schedule


@dataclass
class Prepared:
    """Everything decided before a model is loaded; `--dry-run` stops here."""

    recipe: Recipe
    model_path: Path
    tokenizer: Any
    splits: Splits
    schedule: Schedule
    run_dir: Path
    world: World


def prepare(recipe: Recipe, run_dir: Path | None = None) -> Prepared:

    with status(f"resolving model {recipe.model.path}"):
        model_path = resolve_model(recipe.model.path, recipe.model.revision)
        tokenizer = load_tokenizer(model_path, recipe.model.trust_remote_code)
    with status(f"reading data {recipe.data.path}"):
        splits = load_splits(recipe.data, tokenizer)
    if not splits.train:
        raise FtkitError(f"{recipe.data.path}: the training split is empty.")
    world = distributed.current()
    schedule = make_schedule(recipe.train, len(splits.train), len(splits.valid), world.size)
    return Prepared(recipe, model_path, tokenizer, splits, schedule, Path(run_dir or recipe.output.dir), world)
