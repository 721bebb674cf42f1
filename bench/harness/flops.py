"""The benchmark's FLOP figures: the model FLOPs of a data set, and the machine's GEMM peak, measured here.

A run's achieved FLOP/s is the model FLOPs of the rows it trained on (ftkit.train.flops: forward and
backward of LoRA on the frozen base, attention per example, the head at the loss's positions, from the
model's config and ftkit's tokenization of the rows) over the tool's own train seconds. Both tools of a
pair train on the same rows, so the same FLOPs: their FLOP/s differ only by their time, and the ratio is
the tokens/s ratio. The peak is the best rate of the matrix products this model runs (hidden x hidden and
hidden x intermediate, over about a micro-batch of tokens) in the pair's dtype, timed in this process
before the runs and again after them, with nothing else of the benchmark running.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.datasets import BenchData
from harness.settings import Settings


def _model(model: Path, s: Settings):
    from ftkit.models.flops import Architecture
    from ftkit.train.flops import FlopModel, Method

    arch = Architecture.from_config(json.loads((model / "config.json").read_text()))
    return FlopModel(arch, Method("lora", rank=s.rank))  # all-linear, every block: the benchmark's LoRA


def data_flops(model: Path, s: Settings, data: BenchData) -> float:
    """Model FLOPs of one pass over the data set's rows (forward and backward, LoRA on every linear layer)."""
    return _model(model, s).examples(data.input_lengths, data.target_tokens)


def gemm_shapes(model: Path, s: Settings, data: BenchData) -> list[tuple[int, int, int]]:
    from ftkit.train.flops import probe_tokens

    return _model(model, s).arch.gemm_shapes(probe_tokens(data.input_lengths, s.batch_size))


def gemm_peak(pair: str, s: Settings, shapes: list[tuple[int, int, int]], seconds: float) -> dict:
    """The best FLOP/s of the model's matrix products on the pair's device and dtype (torch: CUDA when there is
    one, else the CPU; MLX: its default device), within about `seconds`: ftkit's own probe (ftkit.backend.peak),
    through the backend's `gemm_flops`, uncached."""
    from ftkit.backend.peak import probe

    dtype = "bfloat16" if s.precision == "bf16" else "float32"
    if pair == "torch":
        import torch
        from ftkit_torch.backend import TorchBackend

        backend, where = TorchBackend(), "torch " + ("cuda" if torch.cuda.is_available() else "cpu")
    else:
        from ftkit_mlx.backend import MlxBackend

        # the MLX pair's models are float32 (and ftkit's MLX backend trains in fp32 on a CPU)
        backend, where, dtype = MlxBackend(), "mlx", "float32"
    t0 = time.perf_counter()
    flops, reached = probe(backend, shapes, dtype, seconds)
    return {"flops": flops, "dtype": dtype, "device": where, "shapes": [list(x) for x in reached],
            "seconds": round(time.perf_counter() - t0, 2), "at": time.strftime("%H:%M:%S")}
