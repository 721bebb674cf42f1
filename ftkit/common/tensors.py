"""Safetensors files as numpy arrays (bfloat16 read as float32), through `safetensors.numpy`.

The core converts adapters between layouts without torch or mlx. numpy has no bfloat16 of its own:
ml_dtypes gives it one, which `safetensors.numpy` then reads; ftkit hands the core float32.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safetensors.numpy reads BF16 tensors
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ftkit.common.errors import AdapterMismatchError


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets; no __metadata__) and where its
    data starts, without reading the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_safetensors(path: Path) -> dict[str, np.ndarray]:

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError, TypeError) as e:
        raise AdapterMismatchError(f"{path}: not a readable safetensors file ({e}).") from None
    return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for k, v in tensors.items()}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
