"""The GEMM probe: the best rate MLX's matmul reaches on its default device, for ftkit.backend.peak."""

from __future__ import annotations

import time

import mlx.core as mx

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def best_flops(shapes: list[tuple[int, int, int]], dtype: str, seconds: float) -> float:
    """The highest FLOP/s of `(m, k) @ (k, n)` in `dtype` over these shapes, each timed for about
    `seconds / len(shapes)`: the fastest of repeated timings (a shared machine's slow moments left out)."""
    best, budget = 0.0, seconds / max(1, len(shapes))
    key = mx.random.key(0)
    for m, k, n in shapes:
        ka, kb = mx.random.split(key)
        a = mx.random.normal((m, k), key=ka).astype(_DTYPES[dtype])
        b = mx.random.normal((k, n), key=kb).astype(_DTYPES[dtype])
        mx.eval(a, b, a @ b)  # warm-up
        inner, start = 1, time.perf_counter()
        while time.perf_counter() - start < budget:
            t0 = time.perf_counter()
            mx.eval([a @ b for _ in range(inner)])
            dt = time.perf_counter() - t0
            best = max(best, 2.0 * m * k * n * inner / dt)
            if dt < 2e-3:  # too short to time alone: time more at once
                inner *= 2
    return best
