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

from ftkit.common.errors import AdapterMismatchError, FtkitError

_LFS_POINTER = b"version https://git-lfs"


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets; no __metadata__) and where its
    data starts, without reading the data; a file that is not whole says so (`check_whole`)."""
    header, start = check_whole(path)
    header.pop("__metadata__", None)
    return header, start


def check_whole(path: Path) -> tuple[dict, int]:
    """The header and data start of a safetensors file that is all there, or an FtkitError naming it
    damaged: a Git LFS pointer in its place, a truncated download (the header says how many bytes the
    data takes, so the expected size is known), or bytes that are no safetensors file at all."""
    path = Path(path)
    if not path.is_file():
        raise FtkitError(f"{path}: no such file.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(_LFS_POINTER[:8]) and (head + f.read(64)).startswith(_LFS_POINTER):
            f.seek(0)
            pointer = f.read(1024).decode("utf-8", "replace")
            real = next((line.split()[1] for line in pointer.splitlines() if line.startswith("size ")), None)
            raise FtkitError(
                f"{path}: damaged: a Git LFS pointer ({size} bytes of text) in place of the weights"
                f"{f' ({real} bytes expected)' if real else ''}: the repository was cloned without git-lfs. "
                f"Run `git lfs pull` in {path.parent}, or download the file again."
            )
        if len(head) < 8:
            raise FtkitError(f"{path}: damaged: {size} bytes, too short for a safetensors file (an interrupted download?); "
                             "download or copy it again.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise FtkitError(f"{path}: damaged: not a safetensors file, or cut short: its first bytes announce a "
                             f"{n}-byte header, and the file has {size} bytes. Download or copy it again.")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
            raise FtkitError(f"{path}: damaged: its safetensors header is not readable; download or copy it again.") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        what = "cut short (an interrupted download or copy?)" if size < expected else "longer than its header says"
        raise FtkitError(f"{path}: damaged: {what}: the safetensors header says {expected} bytes, the file has {size}. "
                         "Download or copy it again.")
    return header, 8 + n


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    check_whole(path)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError, TypeError) as e:
        raise AdapterMismatchError(f"{path}: not a readable safetensors file ({e}).") from None
    return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for k, v in tensors.items()}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
