"""The GEMM probe's products on MLX's default device, for ftkit.backend.peak (which times them)."""

from __future__ import annotations

import mlx.core as mx

from ftkit.backend.peak import fastest

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def best_flops(shapes: list[tuple[int, int, int]], dtype: str, seconds: float) -> float:
    key = mx.random.key(0)

    def product(m: int, k: int, n: int):
        ka, kb = mx.random.split(key)
        a = mx.random.normal((m, k), key=ka).astype(_DTYPES[dtype])
        b = mx.random.normal((k, n), key=kb).astype(_DTYPES[dtype])
        return lambda inner: mx.eval([a @ b for _ in range(inner)])

    return fastest(shapes, product, seconds)
