"""Loading a model (and adapter) for evaluation and generation."""

from __future__ import annotations

from pathlib import Path

from ftkit.adapters import meta as adapter_format
from ftkit.adapters import resolve as adapter_layout
from ftkit.backend.protocol import Backend
from ftkit.backend.registry import get_backend
from ftkit.common.fingerprints import fingerprint_model, fingerprint_tokenizer
from ftkit.models.resolve import resolve_model
from ftkit.models.tokenizer import load_tokenizer
from ftkit.recipe.load import build_recipe
from ftkit.recipe.schema import Recipe


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
            adapter, fingerprint_model(model_path), fingerprint_tokenizer(tokenizer)
        )
    else:
        recipe.method.kind = "full"  # the base alone: nothing to attach
    backend = get_backend(backend_name)
    backend.load(recipe, model_path, adapter=adapter, train=False)
    return backend


def open_model(model: str, backend_name: str, adapter: Path | None):
    """A base model (hub id, folder or .gguf) with an optional adapter, loaded for inference outside a
    recipe: (backend, tokenizer, model folder)."""

    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path)
    recipe = build_recipe({"model": {"path": str(model_path)}, "data": {"path": "-"}}, "--model", check_paths=False)
    return load_for_inference(recipe, backend_name, adapter, model_path, tokenizer), tokenizer, model_path
