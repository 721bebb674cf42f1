from __future__ import annotations

import io
import platform

import pytest
from rich.console import Console

from ftkit.backend import hardware
from ftkit.common.errors import BackendUnavailable

torch_installed = pytest.mark.skipif(not hardware._version("torch"), reason="torch is not installed")


@pytest.fixture(scope="module")
def info():
    return hardware.detect()


def _text(renderable) -> str:
    con = Console(file=io.StringIO(), width=200, record=True)
    con.print(renderable)
    return con.export_text()


def test_detect_sane_here(info):
    assert isinstance(info["os"], str) and info["machine"] and info["python"] == platform.python_version()
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert 1 <= info["cores_physical"] <= info["cores_logical"]
    assert isinstance(info["ram_bytes"], int) and info["ram_bytes"] > 0
    assert info["apple_silicon"] is (platform.system() == "Darwin" and platform.machine() == "arm64")
    assert set(info["backends"]) == {"torch", "mlx"}
    assert set(info["packages"]) == set(hardware.PACKAGES)
    assert all(v is None or isinstance(v, str) for v in info["packages"].values())


@torch_installed
def test_no_cuda_here(info):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert info["cuda"]["count"] == 0 and info["cuda"]["devices"] == []
    assert info["mps"] is False or platform.system() == "Darwin"


@torch_installed
def test_auto_picks_torch_on_linux(info):
    if platform.system() != "Linux":
        pytest.skip("Linux only")
    name, reason = info["auto"]
    assert name == "torch" and "torch" in reason
    assert info["backends"]["torch"]["installed"] and info["backends"]["torch"]["version"]


def test_auto_picks_mlx_on_apple_silicon(monkeypatch):
    import ftkit.backend.registry

    # as if mlx and ftkit's MLX backend were installed, whatever this machine has
    monkeypatch.setattr(ftkit.backend.registry, "installed", lambda name: True)
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    info = hardware.detect()  # sysctl may be missing here: detection must still complete
    assert info["apple_silicon"] is True
    name, reason = info["auto"]
    assert name == "mlx" and "Apple silicon" in reason
    assert info["ram_bytes"] and info["cores_physical"] >= 1


def test_no_backend(monkeypatch):
    def unavailable():
        raise BackendUnavailable("No backend is installed.")

    monkeypatch.setattr(hardware, "pick_auto", unavailable)
    info = hardware.detect()
    assert info["auto"] == (None, "No backend is installed.")
    assert "No backend is installed." in _text(hardware.render(info))


def test_nvidia_smi_fallback(monkeypatch):
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(hardware.shutil, "which", lambda cmd: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(hardware, "_run", lambda *cmd: "NVIDIA H100 80GB HBM3, 81559 MiB\nTesla T4, 15360 MiB")
    cuda, mps = hardware._gpus()
    assert mps is None and cuda["via"] == "nvidia-smi" and cuda["count"] == 2
    assert cuda["devices"][0] == {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 81559 * 2**20, "capability": None, "bf16": None}


def test_render(info):
    text = _text(hardware.render(info))
    assert "CPU" in text and "RAM" in text and "GiB" in text and "--backend auto" in text
    for package in hardware.PACKAGES:
        assert package in text
