"""The backend contract, the registry, and `--backend auto`.

The core owns everything that is not tensor math. A backend loads a model, attaches the method's
trainable parameters on the modules `ftkit.targets.select` picks (the core then sets their initial
values, from `ftkit.init.draw`), wraps it for several processes, runs forward/backward on a `Batch`, steps the optimizer at the LR
the core gives it, evaluates, yields next-token logits for the core's sampler, and saves/loads
adapter tensors in the common layout and its own optimizer/RNG state.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from typing import TYPE_CHECKING

from ftkit.backend.protocol import Backend
from ftkit.common.errors import BackendUnavailable

if TYPE_CHECKING:

    pass


BACKENDS = {
    "torch": ("ftkit_torch.backend", "TorchBackend", "torch", 'pip install "ftkit[torch]"  (CPU: pip install torch==2.13.0 first)'),
    "mlx": ("ftkit_mlx.backend", "MlxBackend", "mlx", 'pip install "ftkit[mlx]"'),
}


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def installed(name: str) -> bool:
    module, _, dep, _ = BACKENDS[name]
    return _importable(dep) and _importable(module)


def pick_auto() -> tuple[str, str]:
    """The backend `auto` picks, and why."""
    if is_apple_silicon():
        if installed("mlx"):
            return "mlx", "Apple silicon (macOS arm64) and mlx is installed"
        if installed("torch"):
            return "torch", "Apple silicon, but mlx is not installed; torch is"
    elif installed("torch"):
        return "torch", f"{platform.system()} {platform.machine()}: torch is the backend here (mlx only when asked)"
    elif installed("mlx"):
        return "mlx", "torch is not installed; mlx is"
    raise BackendUnavailable(
        "No backend is installed. Install one: " + "; or ".join(spec[3] for spec in BACKENDS.values())
    )


def get_backend(name: str) -> Backend:
    if name == "auto":
        name, _ = pick_auto()
    if name not in BACKENDS:
        raise BackendUnavailable(f"Unknown backend {name!r}; choose auto, torch or mlx.")
    module, cls, dep, hint = BACKENDS[name]
    if not _importable(dep):
        raise BackendUnavailable(f"The {name} backend needs the '{dep}' package, which is not installed: {hint}")
    if not _importable(module):
        raise BackendUnavailable(f"The {name} backend is not part of this ftkit installation ({module} is missing).")
    return getattr(importlib.import_module(module), cls)()
