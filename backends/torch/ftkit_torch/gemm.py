"""The GEMM probe's products on a torch device, for ftkit.backend.peak (which times them)."""

from __future__ import annotations

import torch

from ftkit.backend.peak import fastest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def best_flops(shapes: list[tuple[int, int, int]], dtype: str, device: torch.device, seconds: float) -> float:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def product(m: int, k: int, n: int):
        a = torch.randn(m, k, generator=gen).to(device, _DTYPES[dtype])
        b = torch.randn(k, n, generator=gen).to(device, _DTYPES[dtype])

        @torch.no_grad()
        def run(inner: int) -> None:
            for _ in range(inner):
                torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return run

    return fastest(shapes, product, seconds)
