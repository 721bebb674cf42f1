"""Safetensors files as numpy arrays, with bfloat16 read as float32.

The core converts adapters between layouts without torch or mlx; `safetensors.numpy` cannot read
bfloat16 (numpy has no such type), and adapters from mlx-lm or a bf16 PEFT run often hold it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ftkit.common.errors import AdapterMismatchError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
    except (OSError, struct.error, json.JSONDecodeError) as e:
        raise AdapterMismatchError(f"{path}: not a readable safetensors file ({e}).") from None
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif info["dtype"] in _DTYPES:
            arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<"))
        else:
            raise AdapterMismatchError(f"{path}: tensor {name} has dtype {info['dtype']}, which ftkit cannot read.")
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
