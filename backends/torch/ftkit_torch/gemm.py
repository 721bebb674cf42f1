"""The GEMM probe: the best rate torch's matmul reaches on a device, for ftkit.backend.peak."""

from __future__ import annotations

import time

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_flops(shapes: list[tuple[int, int, int]], dtype: str, device: torch.device, seconds: float) -> float:
    """The highest FLOP/s of `(m, k) @ (k, n)` in `dtype` over these shapes, each timed for about
    `seconds / len(shapes)`: the fastest of repeated timings (a shared machine's slow moments left out)."""
    best, budget = 0.0, seconds / max(1, len(shapes))
    gen = torch.Generator(device="cpu").manual_seed(0)
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen).to(device, _DTYPES[dtype])
        b = torch.randn(k, n, generator=gen).to(device, _DTYPES[dtype])
        with torch.no_grad():
            torch.mm(a, b)  # warm-up: kernel selection, caches
            _sync(device)
            inner, start = 1, time.perf_counter()
            while time.perf_counter() - start < budget:
                t0 = time.perf_counter()
                for _ in range(inner):
                    torch.mm(a, b)
                _sync(device)
                dt = time.perf_counter() - t0
                best = max(best, 2.0 * m * k * n * inner / dt)
                if dt < 2e-3:  # too short to time alone (launch overhead, timer resolution): time more at once
                    inner *= 2
    return best
