"""The peak a run's MFU is a fraction of: a datasheet figure for known GPUs, else a measured GEMM rate.

Datasheet figures are dense (no 2:4 sparsity) tensor-core rates for bf16/fp16 and the plain (non-TF32)
rate for fp32, since torch runs fp32 matmuls without TF32 unless told to. Apple quotes one GPU figure per
chip (fp32; the M1/M2 GPUs run fp16 at the same rate), the top GPU configuration of the chip.

Anything else (CPUs, other GPUs, Apple chips without a published figure) gets a short GEMM probe through
the backend (`Backend.gemm_flops`): matrix products of the dtype in use at the model's sizes (hidden x
hidden and hidden x intermediate, over about a micro-batch of tokens; rows grow up to that as the ~1 s
budget allows), the best rate reached, measured once and cached in `<cache root>/gemm_peak.json` keyed by
backend, device, dtype, sizes and the backend package's version; not cached when the machine is busier than
its cores (the figure would be the load's). `FTKIT_PEAK_FLOPS` (FLOP/s) overrides both, for a device whose
figure you know.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ftkit.common.atomic import write_json_atomic
from ftkit.common.errors import FtkitError
from ftkit.common.paths import cache_root

CACHE_FILE = "gemm_peak.json"
PROBE_SECONDS = 1.0  # the probe's budget: it runs before the first step of a run on an unknown device
START_ROWS = 64  # the probe's first products have this many rows, doubled up to the model's while the budget allows

_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
                "fp32": "float32", "float32": "float32", "float": "float32"}

# (device-name pattern, {dtype: TFLOP/s dense}, source). First match wins: the specific names come first.
TABLE: list[tuple[str, dict[str, float], str]] = [
    (r"H100.*(PCIe|PCIE)", {"bfloat16": 756.5, "float16": 756.5, "float32": 51.2}, "NVIDIA H100 PCIe datasheet"),
    (r"H100.*NVL", {"bfloat16": 835.5, "float16": 835.5, "float32": 60.0}, "NVIDIA H100 NVL datasheet"),
    (r"H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}, "NVIDIA H100 SXM datasheet"),
    (r"H200.*NVL", {"bfloat16": 835.5, "float16": 835.5, "float32": 60.0}, "NVIDIA H200 NVL datasheet"),
    (r"H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}, "NVIDIA H200 SXM datasheet"),
    (r"A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}, "NVIDIA A100 datasheet"),
    (r"L40S", {"bfloat16": 362.05, "float16": 362.05, "float32": 91.6}, "NVIDIA L40S datasheet"),
    (r"\bL4\b", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}, "NVIDIA L4 datasheet"),
    (r"\bA10\b", {"bfloat16": 125.0, "float16": 125.0, "float32": 31.2}, "NVIDIA A10 datasheet"),
    (r"RTX 4090", {"bfloat16": 165.2, "float16": 165.2, "float32": 82.6}, "NVIDIA Ada whitepaper (FP32 accumulate)"),
    (r"RTX 3090", {"bfloat16": 71.0, "float16": 71.0, "float32": 35.6}, "NVIDIA Ampere GA102 whitepaper (FP32 accumulate)"),
    (r"RTX A6000", {"bfloat16": 154.8, "float16": 154.8, "float32": 38.7}, "NVIDIA RTX A6000 datasheet"),
    *((rf"Apple {chip}\b(?! (Pro|Max|Ultra))" if not variant else rf"Apple {chip} {variant}\b",
       dict.fromkeys(("bfloat16", "float16", "float32"), tflops), "Apple press release (GPU, top configuration)")
      for chip, variant, tflops in (("M1", "Ultra", 21.2), ("M1", "Max", 10.4), ("M1", "Pro", 5.2), ("M1", "", 2.6),
                                    ("M2", "Ultra", 27.2), ("M2", "Max", 13.6), ("M2", "Pro", 6.8), ("M2", "", 3.6))),
]


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s of one device
    dtype: str
    source: str  # "datasheet" | "probe" | "FTKIT_PEAK_FLOPS"
    detail: str  # what the figure is: the device and document, or the probe's sizes, time and date

    def fields(self) -> dict[str, Any]:
        """What the run record says of it."""
        return {"peak_flops_per_sec": self.flops, "peak_dtype": self.dtype, "peak_source": self.source, "peak_detail": self.detail}


def dtype_name(name: str) -> str:
    return _DTYPE_NAMES.get(str(name).lower().replace("torch.", "").replace("mlx.core.", ""), str(name))


def compute_dtype(info: dict[str, Any]) -> str:
    """The dtype the matmuls run in: the autocast precision where there is one, else the weights' dtype."""
    precision = dtype_name(info.get("precision", ""))
    return precision if precision in ("bfloat16", "float16") else dtype_name(info.get("dtype", "float32"))


def device_name(info: dict[str, Any], cpu: str | None) -> str:
    """The accelerator's name from a backend's description ("cuda:0 (NVIDIA H100 80GB HBM3)"), or the
    CPU's (an Apple chip's GPU is named by its chip: "Apple M2 Max GPU")."""
    device = str(info.get("device", ""))
    inner = re.search(r"\((.+)\)", device)
    if device.startswith("cuda") and inner:
        return inner.group(1)
    if "Metal" in device:
        return f"{cpu or 'Apple'} GPU"
    return f"{cpu or 'unknown'} CPU"


def from_table(device: str, dtype: str) -> Peak | None:
    for pattern, figures, source in TABLE:
        if re.search(pattern, device) and dtype in figures:
            return Peak(figures[dtype] * 1e12, dtype, "datasheet", f"{device}: {figures[dtype]:g} TFLOP/s {dtype} dense ({source})")
    return None


def _cache() -> dict[str, Any]:
    path = cache_root() / CACHE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _busy(load: float | None) -> bool:
    """More runnable processes than cores: threads of a matmul wait for one another, and the rate measured is the
    machine's load, not its peak (on a 2-core CPU at load 12, a 256 x 64 x 128 product ran 1000x slower)."""
    return load is not None and load > (os.cpu_count() or 1)


def fastest(shapes: list[tuple[int, int, int]], product: Callable[[int, int, int], Callable[[int], None]], seconds: float) -> float:
    """The highest FLOP/s of `(m, k) @ (k, n)` over these shapes, each timed for about `seconds / len(shapes)`: the
    fastest of repeated timings (a shared machine's slow moments left out). A backend's `gemm_flops` supplies
    `product(m, k, n)`: its operands made once, it returns a function that runs `inner` such products and returns when
    they are done (synchronized with the device)."""
    best, budget = 0.0, seconds / max(1, len(shapes))
    for m, k, n in shapes:
        run = product(m, k, n)
        run(1)  # warm-up: kernel selection, caches, the operands' own evaluation
        inner, start = 1, time.perf_counter()
        while time.perf_counter() - start < budget:
            t0 = time.perf_counter()
            run(inner)
            dt = time.perf_counter() - t0
            best = max(best, 2.0 * m * k * n * inner / dt)
            if dt < 2e-3:  # too short to time alone (launch overhead, timer resolution): time more at once
                inner *= 2
    return best


def probe(backend: Any, shapes: list[tuple[int, int, int]], dtype: str, seconds: float) -> tuple[float, list[tuple[int, int, int]]]:
    """The best FLOP/s over `shapes` (and the sizes reached): each shape's rows grow from START_ROWS to its own
    while its share of `seconds` allows, so a slow device (MLX on a CPU: a few GFLOP/s) never spends seconds
    on one product, and a fast one is timed at the model's sizes."""
    best, reached = 0.0, []
    for m, k, n in shapes:
        end = time.perf_counter() + seconds / len(shapes)
        rows = min(m, START_ROWS)
        while True:
            t0 = time.perf_counter()
            best = max(best, float(backend.gemm_flops([(rows, k, n)], dtype, min(0.1, max(0.0, end - t0) / 3))))
            took = time.perf_counter() - t0
            if rows >= m or time.perf_counter() + 2 * took > end:  # the next size takes about twice as long
                break
            rows = min(m, rows * 2)
        reached.append((rows, k, n))
    return best, reached


def measured(backend: Any, key: str, device: str, dtype: str, shapes: list[tuple[int, int, int]],
             seconds: float = PROBE_SECONDS) -> Peak:
    """The probe's figure for `key`, measured now unless the cache holds it; cached unless the machine was busy."""
    hit, note = _cache().get(key), ""
    if not hit:
        t0 = time.perf_counter()
        flops, reached = probe(backend, shapes, dtype, seconds)
        hit = {"flops": flops, "shapes": [list(s) for s in reached], "seconds": round(time.perf_counter() - t0, 3),
               "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": _load_average()}
        if _busy(hit["load_average"]):
            note = f" (not cached: more load than the {os.cpu_count()} cores; measured again next run)"
        else:
            try:
                write_json_atomic(cache_root() / CACHE_FILE, {**_cache(), key: hit})
            except OSError:
                note = " (not cached: the cache folder is not writable)"
    load = f", load average {hit['load_average']:.1f}" if hit.get("load_average") is not None else ""
    sizes = ", ".join("x".join(map(str, s)) for s in hit.get("shapes", shapes))
    return Peak(hit["flops"], dtype, "probe", f"{device}: best {dtype} GEMM rate at (m, k, n) = {sizes}, {hit['seconds']} s, "
                                                f"measured {hit['measured']}{load}{note}")


def for_run(backend: Any, info: dict[str, Any], cpu: str | None, shapes: list[tuple[int, int, int]]) -> Peak:
    """The peak of one device of this run: FTKIT_PEAK_FLOPS, else the table, else the (cached) probe."""
    dtype, device = compute_dtype(info), device_name(info, cpu)
    given = os.environ.get("FTKIT_PEAK_FLOPS")
    if given:
        try:
            flops = float(given)
        except ValueError:
            raise FtkitError(f"FTKIT_PEAK_FLOPS = {given!r}: give the device's peak in FLOP/s, e.g. 989e12, or unset it.") from None
        return Peak(flops, dtype, "FTKIT_PEAK_FLOPS", f"{device}: set by FTKIT_PEAK_FLOPS")
    found = from_table(device, dtype)
    if found is not None:
        return found
    version = info.get(backend.name, "")
    key = f"{backend.name} {version}|{device}|{dtype}|{';'.join('x'.join(map(str, s)) for s in shapes)}"
    return measured(backend, key, device, dtype, shapes)
