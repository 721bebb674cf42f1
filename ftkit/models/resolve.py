"""Where a model loads from: a local folder as is, a .gguf or llama2.c file converted once, a hub id downloaded."""

from __future__ import annotations

from pathlib import Path

from ftkit.common.errors import FtkitError
from ftkit.common.hub import looks_like_hub_id, snapshot
from ftkit.common.suggest import missing_path
from ftkit.models.convert import convert, source_kind
from ftkit.models.folder import check_folder


def resolve_model(path: str, revision: str | None = None) -> Path:
    """The local folder a model loads from: a folder as is (or, when it has no config.json but one
    .gguf, that file converted), a .gguf or llama2.c .bin converted (once; cached), a hub id
    `org/name` downloaded (config, tokenizer and safetensors files). The folder is checked whole
    (ftkit.models.folder) before any backend reads it."""
    folder = _locate(path, revision)
    check_folder(folder)
    return folder


def _locate(path: str, revision: str | None) -> Path:
    local = Path(path).expanduser()
    if local.is_dir():
        ggufs = sorted(local.glob("*.gguf"))
        if not (local / "config.json").exists() and len(ggufs) == 1:
            return convert(ggufs[0])
        return local
    if local.is_file():
        if source_kind(local) is None:
            raise FtkitError(
                f"{path}: ftkit loads a Hugging Face model folder, a .gguf file or a llama2.c .bin "
                f"checkpoint; this file is none of those."
            )
        return convert(local)
    if not looks_like_hub_id(path):
        raise FtkitError(f"{path}: no such file or folder, and not a Hugging Face hub id (org/name).{missing_path(path)}")
    return snapshot(path, revision, what="model", need_weights=True)
