"""Loss and perplexity of a base model, or a base plus an adapter, on a data split."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftkit import adapter as adapter_format
from ftkit import adapter_layout
from ftkit.backend import Backend, get_backend
from ftkit.errors import FtkitError
from ftkit.recipe import Recipe


def is_model_folder(path: Path) -> bool:
    """A full fine-tune's output is a model folder, not a PEFT adapter."""
    return (path / "config.json").exists() and not (path / "adapter_config.json").exists()


def load_for_inference(recipe: Recipe, backend_name: str, adapter: Path | None, model_path: Path, tokenizer) -> Backend:
    """Load base (+ adapter) for evaluation or generation, refusing an adapter made for another base."""
    recipe = recipe.model_copy(deep=True)
    if adapter is not None and is_model_folder(adapter):
        model_path, adapter = adapter, None
        recipe.method.kind = "full"
    elif adapter is not None:
        adapter = adapter_layout.resolve(adapter)
        adapter_format.check_compatible(
            adapter, adapter_format.fingerprint_model(model_path), adapter_format.fingerprint_tokenizer(tokenizer)
        )
    else:
        recipe.method.kind = "full"  # the base alone: nothing to attach
    backend = get_backend(backend_name)
    backend.load(recipe, model_path, adapter=adapter, train=False)
    return backend


def open_model(model: str, backend_name: str, adapter: Path | None):
    """A base model (hub id, folder or .gguf) with an optional adapter, loaded for inference outside a
    recipe: (backend, tokenizer, model folder)."""
    from ftkit.convert import resolve_model
    from ftkit.loop import load_tokenizer
    from ftkit.recipe import build_recipe

    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path)
    recipe = build_recipe({"model": {"path": str(model_path)}, "data": {"path": "-"}}, "--model", check_paths=False)
    return load_for_inference(recipe, backend_name, adapter, model_path, tokenizer), tokenizer, model_path


def evaluate_split(recipe: Recipe, backend_name: str, adapter: Path | None, split: str = "test") -> dict[str, Any]:
    from ftkit.loop import evaluate, prepare

    prep = prepare(recipe)
    examples = getattr(prep.splits, split)
    if not examples:
        raise FtkitError(
            f"{recipe.data.path}: the {split} split is empty. Add a {split} file to the data folder, or set "
            f"data.{split}_fraction to hold out part of the training data."
        )
    backend = load_for_inference(recipe, backend_name, adapter, prep.model_path, prep.tokenizer)
    loss = evaluate(backend, examples, recipe.train.batch_size, prep.tokenizer.pad_token_id)
    return {
        "split": split,
        "examples": len(examples),
        "target_tokens": sum(sum(e.mask[1:]) for e in examples),
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "backend": backend.name,
        "adapter": str(adapter) if adapter else None,
    }
