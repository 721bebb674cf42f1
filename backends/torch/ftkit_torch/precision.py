"""What `torch.precision = "auto"` becomes on the device a run trains on, and the reason the banner gives.

- CUDA: bf16 where the GPU has it (`torch.cuda.is_bf16_supported()`: Ampere and later), else fp32.
- CPU: fp32. bf16 autocast is chosen on a CPU only where it is both faster than fp32 and the quickstart's
  validation loss stays within 1% of fp32's; on a CPU without bf16 instructions (`avx512_bf16`,
  `amx_bf16`) it is emulated and never pays. On one with them it was measured (bench/cpu_bf16.py and
  the quickstart, AMD EPYC, 2 cores, avx512_bf16 without AMX, torch 2.13): faster, but over the loss
  bound, so fp32 stays; CPU_BF16_MEASURED holds the figures and CPU_BF16_PAYS the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo's names for native bf16 matrix instructions
CPU_BF16_MEASURED = "bf16 measured 1.5x faster here, but its quickstart validation loss is 1.6% above fp32's (bound: 1%)"
CPU_BF16_PAYS = False  # the verdict of that measurement: True would make auto = bf16 on CPUs with CPU_BF16_FLAGS


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


def resolve(want: str, device_type: str, *, cuda_bf16: bool = False, flags: frozenset[str] = frozenset(),
            cpu_bf16_pays: bool | None = None) -> Choice:
    """`torch.precision` as the recipe says it, on `device_type`; `flags`: the CPU's (cpu_flags());
    `cpu_bf16_pays`: the measured verdict for CPUs with bf16 instructions (default CPU_BF16_PAYS)."""
    cpu_bf16_pays = CPU_BF16_PAYS if cpu_bf16_pays is None else cpu_bf16_pays
    if want != "auto":
        return Choice(want, None)
    if device_type == "cuda":
        return Choice("bf16", "auto: bf16 on this GPU") if cuda_bf16 else Choice("fp32", "auto: fp32, this GPU has no bf16")
    if device_type != "cpu":
        return Choice("fp32", f"auto: fp32 on {device_type}")
    native = sorted(set(CPU_BF16_FLAGS) & flags)
    if not native:
        return Choice("fp32", "auto: fp32 on CPU, no bf16 instructions (avx512_bf16, amx_bf16)")
    if cpu_bf16_pays:
        return Choice("bf16", f"auto: bf16 on CPU with {', '.join(native)}")
    return Choice("fp32", f"auto: fp32 on CPU, {CPU_BF16_MEASURED}")
