"""`ftkit convert --quantize`: an MLX-quantized copy of a model folder, through the MLX backend's contract."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ftkit.backend.registry import BACKENDS, get_backend, installed
from ftkit.common.atomic import atomic_dir
from ftkit.common.errors import BackendUnavailable, FtkitError
from ftkit.common.paths import cache_root


def quantize_mlx(src: Path, out: Path | None, bits: int, group_size: int = 64, force: bool = False) -> Path:
    """`src` (a model folder) quantized in MLX's format, for the MLX backend's QLoRA. Needs mlx."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise FtkitError(f"--quantize {bits}: MLX quantizes to 2, 3, 4, 5, 6 or 8 bits.")
    if not installed("mlx"):
        raise BackendUnavailable(f"--quantize writes MLX's quantized format and needs the MLX backend: {BACKENDS['mlx'][3]}")
    if not (src / "config.json").exists():
        raise FtkitError(f"{src}: not a model folder (no config.json).")
    if out is None:
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.glob("*.safetensors"))
        short = hashlib.sha256(json.dumps([str(src.resolve()), files]).encode()).hexdigest()[:12]
        out = cache_root() / "quantized" / f"{src.name}-q{bits}g{group_size}-{short}"
    dest = Path(out).expanduser().resolve()
    if (dest / "config.json").exists() and not force:
        q = json.loads((dest / "config.json").read_text()).get("quantization") or {}
        if (q.get("bits"), q.get("group_size")) == (bits, group_size):
            return dest
        raise FtkitError(f"{dest}: already holds a model; pass --force to replace it, or choose another --out.")
    backend = get_backend("mlx")  # constructing one loads no model
    with atomic_dir(dest) as tmp:
        backend.quantize_folder(src, tmp, bits, group_size)
    return dest
