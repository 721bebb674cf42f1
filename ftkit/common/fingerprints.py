"""Fingerprints of a model's weights and a tokenizer, so an adapter is never loaded onto another base."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ftkit.common.tensors import read_header

_SAMPLES, _SAMPLE_BYTES = 8, 4096


def _safetensors_digest(path: Path, h: "hashlib._Hash") -> None:
    """Hash the header (names, shapes, dtypes) and a few evenly spaced samples of the data.

    Reading the whole file would cost seconds on a 7B model; the samples catch different weights of
    the same architecture, which is the mistake this guards against.
    """
    header, start = read_header(path)
    h.update(json.dumps(sorted((k, v["dtype"], v["shape"]) for k, v in header.items())).encode())
    size = path.stat().st_size - start
    with open(path, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(start + (size * i) // _SAMPLES)
            h.update(f.read(_SAMPLE_BYTES))


def fingerprint_model(folder: Path) -> str:
    """A content fingerprint of a model folder's weights, the same whichever backend reads them."""
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.npz"))
        for path in files:
            h.update(path.name.encode())
            with open(path, "rb") as f:
                size = path.stat().st_size
                for i in range(_SAMPLES):
                    f.seek((size * i) // _SAMPLES)
                    h.update(f.read(_SAMPLE_BYTES))
    for path in files:
        if path.suffix == ".safetensors":
            _safetensors_digest(path, h)
    return "sha256:" + h.hexdigest()[:32]


def fingerprint_tokenizer(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    h = hashlib.sha256(json.dumps([vocab, specials]).encode())
    return "sha256:" + h.hexdigest()[:32]
