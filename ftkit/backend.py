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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ftkit.errors import BackendUnavailable

if TYPE_CHECKING:
    import numpy as np

    from ftkit.recipe import Recipe


@dataclass
class Batch:
    """One micro-batch, already shifted: the model reads `inputs[:, t]` and should predict `targets[:, t]`.

    `mask[:, t]` is 1.0 where that prediction counts toward the loss; `attention_mask` marks real
    (non-padding) input tokens.
    """

    inputs: "np.ndarray"  # int32 [B, T]
    targets: "np.ndarray"  # int32 [B, T]
    mask: "np.ndarray"  # float32 [B, T]
    attention_mask: "np.ndarray"  # int32 [B, T]
    # Packed rows (ftkit.packing): each token's position within its example, restarting at 0 where
    # an example starts. Attention must stay inside each example; None for one example per row.
    positions: "np.ndarray | None" = None

    @property
    def n_targets(self) -> int:
        return int(self.mask.sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


@runtime_checkable
class Backend(Protocol):
    name: str

    def load(self, recipe: "Recipe", model_path: Path, *, adapter: Path | None, train: bool) -> None:
        """Load the base from a local folder, attach the method (optionally from `adapter`)."""

    def describe(self) -> dict[str, Any]:
        """What the run log and ftkit.json record: device, dtype, precision, parameter counts."""

    def start_training(self) -> None:
        """Called once the starting adapter values are set: wrap for DDP/FSDP, make the optimizer."""

    def forward_backward(self, batch: Batch, scale: float, sync: bool = True) -> Any:
        """Accumulate gradients of `scale * sum(target-token losses)`; return the unscaled sum, as a
        float or a device scalar (anything with `.item()`: the core reads it only when it reports, so
        a step needs no host sync). `sync=False`: more micro-batches of this step follow, so several
        processes need not reduce their gradients yet."""

    def optimizer_step(self, lr: float) -> dict[str, Any]:
        """Clip, step at `lr`, zero the gradients; return e.g. {"grad_norm": ...} (floats or device scalars)."""

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Sum each value over the run's processes (the values themselves when there is one)."""

    def barrier(self) -> None:
        """Wait for every process of the run (nothing when there is one)."""

    def eval_loss(self, batch: Batch) -> float:
        """Sum of target-token losses, no gradients."""

    def row_losses(self, batch: Batch) -> "np.ndarray":
        """Each row's sum of target-token losses, float64 [rows], no gradients (a padded batch: no positions)."""

    def next_logits(self, new_ids: list[int], state: Any | None) -> tuple["np.ndarray", Any]:
        """Float32 logits for the token after `new_ids` (appended to `state`'s context; None starts over)."""

    def adapter_tensors(self) -> dict[str, "np.ndarray"]:
        """The adapter's tensors in the common layout: PEFT's names and shapes, float32."""

    def set_adapter_tensors(self, tensors: dict[str, "np.ndarray"]) -> None:
        """Overwrite the adapter's tensors (same names and shapes as `adapter_tensors`)."""

    def embedding_rows(self, ids: list[int]) -> "np.ndarray":
        """The base model's input embeddings of these token ids, float32 [len(ids), hidden]."""

    def save_adapter(self, dest: Path) -> None:
        """Write the trainable part in the common format (PEFT files; a full model folder for `full`)."""

    def fuse(self, dest: Path, dequantize: bool) -> None:
        """Merge the adapter into the base and write a plain Hugging Face model folder (weights + config)."""

    def save_state(self, dest: Path) -> None:
        """Write what resuming needs beyond the adapter: optimizer state, RNG."""

    def load_state(self, src: Path) -> None:
        """Restore what `save_state` wrote."""


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
