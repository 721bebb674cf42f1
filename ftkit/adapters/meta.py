"""The common adapter format: PEFT's files plus `ftkit.json`, and the fingerprints that guard it.

A folder holds `adapter_config.json` + `adapter_model.safetensors` (PEFT loads it as it is) and
`ftkit.json` with what PEFT does not carry. For full fine-tuning the folder is a plain Hugging Face
model folder instead, with the same `ftkit.json` beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftkit import __version__
from ftkit.adapters.layout import adapter_kind, read_config
from ftkit.common.atomic import write_json_atomic
from ftkit.common.errors import AdapterMismatchError

FTKIT_JSON = "ftkit.json"




def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    write_json_atomic(folder / FTKIT_JSON, {"ftkit_version": __version__, **meta})


def read_meta(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / FTKIT_JSON
    return json.loads(path.read_text()) if path.exists() else None


def check_compatible(adapter: Path, model_fingerprint: str, tokenizer_fingerprint: str | None = None) -> None:
    """Refuse an adapter trained on another base, before any tensor is loaded."""
    meta = read_meta(adapter)
    if not meta:
        return  # a PEFT adapter from another tool: nothing recorded to check against
    want = meta.get("base_model", {}).get("fingerprint")
    if want and want != model_fingerprint:
        raise AdapterMismatchError(
            f"{adapter} was trained on base model {meta['base_model'].get('path')} (fingerprint {want}), "
            f"but the model loaded now has fingerprint {model_fingerprint}. Load it onto the base it was "
            "trained on (model.path / --model)."
        )
    want_tok = meta.get("tokenizer", {}).get("fingerprint")
    if want_tok and tokenizer_fingerprint and want_tok != tokenizer_fingerprint:
        raise AdapterMismatchError(
            f"{adapter} was trained with a different tokenizer ({want_tok}) than the one loaded ({tokenizer_fingerprint})."
        )


def check_method(adapter: Path, kind: str, rank: int | None = None, n_virtual: int | None = None) -> None:
    """Continuing training from an adapter must keep its method and rank, or say which differs."""
    cfg = read_config(adapter)
    found = adapter_kind(cfg)
    if found != kind:
        raise AdapterMismatchError(f"{adapter} is a {found} adapter, but the recipe's method.kind is {kind!r}.")
    if rank is not None and kind in ("lora", "dora") and cfg.get("r") != rank:
        raise AdapterMismatchError(f"{adapter} has rank {cfg.get('r')}, but the recipe's method.rank is {rank}.")
    if kind in ("prompt", "prefix") and n_virtual is not None and cfg.get("num_virtual_tokens") != n_virtual:
        raise AdapterMismatchError(
            f"{adapter} has {cfg.get('num_virtual_tokens')} virtual tokens, but the recipe's method.num_virtual_tokens is {n_virtual}."
        )
