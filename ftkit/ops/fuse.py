"""Merge an adapter into its base model and write a plain Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

from ftkit.adapters import layout as adapter_layout
from ftkit.adapters import meta as adapter_format
from ftkit.adapters.resolve import resolve
from ftkit.common.atomic import atomic_dir
from ftkit.common.errors import FtkitError
from ftkit.common.fingerprints import fingerprint_model
from ftkit.evaluate.inference import open_model


def base_model_of(adapter: Path) -> str | None:
    """The base an adapter records: ftkit.json's, else PEFT's base_model_name_or_path."""
    meta = adapter_format.read_meta(adapter) or {}
    path = meta.get("base_model", {}).get("path")
    if path:
        return path
    return adapter_layout.read_config(adapter).get("base_model_name_or_path")


def fuse(adapter: Path, out: Path, *, model: str | None, backend_name: str, dequantize: bool, force: bool) -> dict:

    adapter = resolve(adapter)
    model = model or base_model_of(adapter)
    if not model:
        raise FtkitError(f"{adapter} does not record its base model; pass --model.")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FtkitError(f"{out} already exists and is not empty; pass --force to replace it, or choose another --out.")
    backend, tokenizer, model_path = open_model(model, backend_name, adapter)
    with atomic_dir(out) as tmp:
        backend.fuse(tmp, dequantize)
        tokenizer.save_pretrained(tmp)
        adapter_format.write_meta(tmp, {
            "backend": backend.name, "method": "fused",
            "fused_from": {"adapter": str(adapter), "adapter_meta": adapter_format.read_meta(adapter)},
            "base_model": {"path": model, "fingerprint": fingerprint_model(model_path)},
            "dequantized": dequantize,
        })
    return {"model": str(out), "backend": backend.name, "base_model": model, "adapter": str(adapter)}
