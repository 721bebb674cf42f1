"""What `torch.precision = "auto"` becomes on the device a run trains on, and the reason the run log gives.

- CUDA: bf16 where the GPU has it (`torch.cuda.is_bf16_supported()`: Ampere and later), else fp32.
- CPU, training: bf16 where the CPU has native bf16 instructions (`avx512_bf16`, `amx_bf16`), else fp32 (bf16
  would be emulated there). The rule for a CPU: bf16 only where it trains faster than fp32 AND the quickstart's
  validation loss stays within 1% of fp32's. Measured on this project's CPU (AMD EPYC, 2 cores, avx512_bf16
  without AMX, torch 2.13; bench/cpu_bf16.py and recipes/quickstart.toml): both hold, so CPU_BF16_PAYS is on.
  Not measured on other CPUs: the verdict is applied to amx_bf16 ones too, whose bf16 matrix units are faster still.
  On 20 steps (bench/cpu_bf16.py) bf16's validation loss was 1.6% above fp32's, the gap closing as training
  goes on (0.7% at the quickstart's 60): a run that needs fp32's last digits sets torch.precision = "fp32".
- CPU, anything else (eval, generate, fuse, export): fp32. Only training was measured, and a model loaded for
  fusing in bf16 would write its weights rounded to bf16.
`FTKIT_CPU_BF16=0|1` overrides the verdict (the test suite sets 0, so that its pinned losses are the same on CPUs
with and without bf16 instructions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ftkit.common.errors import FtkitError

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo's names for native bf16 matrix instructions
# The measurement behind the CPU verdict (2026-12-02, load average 1.8-2.0 on 2 cores): LoRA on SmolLM2-135M,
# bf16 autocast against fp32: 1.32x the trained tokens/s (185 against 140, bench/cpu_bf16.py, medians of 2);
# the quickstart's 60 steps at 1.39x (188 against 135 tok/s, median report window), validation loss 1.8625
# against 1.8499 (+0.68%; the bound is 1%).
CPU_BF16_MEASURED = "measured 1.3x fp32's speed, quickstart validation loss +0.7%"
CPU_BF16_PAYS = True  # the verdict: auto = bf16 on CPUs with CPU_BF16_FLAGS; False keeps fp32 on every CPU


@dataclass(frozen=True)
class Choice:
    name: str  # fp32 | bf16 | fp16
    reason: str | None  # why auto chose it; None when the recipe named the precision


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where there is no /proc/cpuinfo (macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def resolve(want: str, device_type: str, *, train: bool = True, cuda_bf16: bool = False, flags: frozenset[str] = frozenset(),
            cpu_bf16_pays: bool | None = None) -> Choice:
    """`torch.precision` as the recipe says it, on `device_type`, for a model loaded to train or not; `flags`: the
    CPU's (cpu_flags()); `cpu_bf16_pays`: the measured verdict for CPUs with bf16 instructions (default CPU_BF16_PAYS)."""
    cpu_bf16_pays = _verdict() if cpu_bf16_pays is None else cpu_bf16_pays
    if want != "auto":
        return Choice(want, None)
    if device_type == "cuda":
        return Choice("bf16", "auto: bf16 on this GPU") if cuda_bf16 else Choice("fp32", "auto: fp32, this GPU has no bf16")
    if device_type != "cpu":
        return Choice("fp32", f"auto: fp32 on {device_type}")
    native = sorted(set(CPU_BF16_FLAGS) & flags)
    if not train:
        return Choice("fp32", "auto: fp32 on CPU outside training (bf16 is measured for training only)")
    if not native:
        return Choice("fp32", "auto: fp32 on CPU, no bf16 instructions (avx512_bf16, amx_bf16)")
    if cpu_bf16_pays:
        return Choice("bf16", f"auto: bf16 on CPU with {', '.join(native)}, {CPU_BF16_MEASURED}")
    return Choice("fp32", f"auto: fp32 on CPU with {', '.join(native)}, bf16 not worth it here")


def _verdict() -> bool:
    given = os.environ.get("FTKIT_CPU_BF16")
    if given is None:
        return CPU_BF16_PAYS
    if given not in ("0", "1"):
        raise FtkitError(f"FTKIT_CPU_BF16 = {given!r}: 1 lets torch.precision = 'auto' pick bf16 on a CPU with bf16 "
                         "instructions, 0 keeps fp32; or unset it (the measured default), or set torch.precision in the recipe.")
    return given == "1"
