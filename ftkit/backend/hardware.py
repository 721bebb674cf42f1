"""What this machine has (CPU, RAM, GPUs, installed backends) and which backend `auto` would pick: `ftkit info`."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from ftkit.backend.registry import BACKENDS, installed, is_apple_silicon, pick_auto
from ftkit.common.errors import BackendUnavailable

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "mlx", "mlx-lm", "datasets")


def _run(*cmd: str) -> str | None:
    """A command's stdout, or None when it is missing or fails: detection never raises."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu(system: str) -> tuple[str, int | None]:
    """CPU model name and physical core count."""
    if system == "Darwin":
        name = _run("sysctl", "-n", "machdep.cpu.brand_string")
        cores = _run("sysctl", "-n", "hw.physicalcpu")
        return name or platform.processor() or platform.machine(), int(cores) if cores and cores.isdigit() else None
    name, physical, ids = None, None, set()
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and name is None:
            name = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            ids.add((physical, value))
    # ARM Linux lists neither model name nor core ids; the count then falls back to logical cores.
    return name or platform.processor() or platform.machine(), len(ids) or None


def _ram_bytes(system: str) -> int | None:
    if system == "Darwin":
        out = _run("sysctl", "-n", "hw.memsize")
        if out and out.isdigit():
            return int(out)
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> tuple[dict[str, Any], bool | None]:
    """CUDA GPUs, and whether torch sees MPS (None when torch is not installed)."""
    cuda: dict[str, Any] = {"count": 0, "devices": [], "via": None}
    mps = None
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch  # lazy: torch is a backend's

            mps = bool(torch.backends.mps.is_available())
            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    props = torch.cuda.get_device_properties(i)
                    cuda["devices"].append({
                        "name": props.name,
                        "memory_bytes": props.total_memory,
                        "capability": f"{props.major}.{props.minor}",
                        "bf16": props.major >= 8,
                    })
                cuda["via"] = "torch"
        except Exception:  # a broken torch install must not break `ftkit info`
            pass
    # A CPU-only torch on a GPU machine sees nothing; nvidia-smi still shows what is there.
    if not cuda["devices"] and shutil.which("nvidia-smi"):
        out = _run("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader")
        for line in (out or "").splitlines():
            name, _, memory = (part.strip() for part in line.rpartition(","))
            mib = memory.split()[0] if memory else ""
            cuda["devices"].append({
                "name": name,
                "memory_bytes": int(mib) * 2**20 if mib.isdigit() else None,
                "capability": None,
                "bf16": None,
            })
        if cuda["devices"]:
            cuda["via"] = "nvidia-smi"
    cuda["count"] = len(cuda["devices"])
    return cuda, mps


def detect() -> dict[str, Any]:
    system = platform.system()
    cpu_name, physical = _cpu(system)
    logical = os.cpu_count() or 1
    cuda, mps = _gpus()
    try:
        auto: tuple[str | None, str] = pick_auto()
    except BackendUnavailable as e:
        auto = (None, str(e))
    return {
        "os": f"{system} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": cpu_name,
        "cores_physical": physical or logical,
        "cores_logical": logical,
        "ram_bytes": _ram_bytes(system),
        "apple_silicon": is_apple_silicon(),
        "cuda": cuda,
        "mps": mps,
        "backends": {
            name: {"installed": installed(name), "package": dep, "version": _version(dep), "install": hint}
            for name, (_, _, dep, hint) in BACKENDS.items()
        },
        "packages": {name: _version(name) for name in PACKAGES},
        "auto": auto,
    }


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def render(info: dict[str, Any]):
    """Tables for `ftkit info`."""
    system = Table(title="Machine", show_header=False, title_justify="left")
    system.add_column(style="bold")
    system.add_column()
    system.add_row("OS", f"{info['os']} ({info['machine']})")
    system.add_row("Python", info["python"])
    system.add_row("CPU", f"{info['cpu']}: {info['cores_physical']} physical / {info['cores_logical']} logical cores")
    system.add_row("RAM", _gib(info["ram_bytes"]))
    system.add_row("Apple silicon", "yes" if info["apple_silicon"] else "no")
    cuda = info["cuda"]
    if cuda["devices"]:
        for i, gpu in enumerate(cuda["devices"]):
            extra = f", sm {gpu['capability']}, bf16 {'yes' if gpu['bf16'] else 'no'}" if gpu["capability"] else ""
            system.add_row(f"CUDA {i}", f"{gpu['name']}, {_gib(gpu['memory_bytes'])}{extra}")
        if cuda["via"] == "nvidia-smi" and info["packages"]["torch"]:
            system.add_row("", "[yellow]torch cannot use these GPUs (a CPU-only build?)[/]")
    else:
        system.add_row("CUDA", "none")
    system.add_row("MPS", {True: "available", False: "not available", None: "unknown (torch not installed)"}[info["mps"]])

    backends = Table(title="Backends", title_justify="left")
    backends.add_column("backend", style="bold")
    backends.add_column("status")
    for name, b in info["backends"].items():
        backends.add_row(name, f"{b['package']} {b['version']}" if b["installed"] else f"[dim]not installed: {escape(b['install'])}[/]")

    packages = Table(title="Packages", title_justify="left")
    packages.add_column("package", style="bold")
    packages.add_column("version")
    for name, version in info["packages"].items():
        packages.add_row(name, version or "[dim]not installed[/]")

    name, reason = info["auto"]
    auto = f"[bold]--backend auto[/] -> [green]{name}[/]: {reason}" if name else f"[red]--backend auto: {reason}[/]"
    return Group(system, "", backends, "", packages, "", auto)
