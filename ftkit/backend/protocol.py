"""The backend contract: what the core asks of a backend (a Protocol, not a base class)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ftkit.data.batch import Batch, PairBatch

if TYPE_CHECKING:
    import numpy as np

    from ftkit.recipe.schema import Recipe


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

    def set_reference(self, adapter: Path | None) -> None:
        """What DPO's reference passes use from now on (called after `load`, before `start_training`): None = the
        base with the adapter switched off (for `full`: the base model at the recipe's model path, a frozen copy);
        a path = that adapter folder (common format; a model folder for `full`) loaded frozen beside the trained one.
        Resume calls it with the same argument as the run that started, so the reference never moves."""

    def pair_forward_backward(self, batch: PairBatch, scale: float, sync: bool = True) -> dict[str, Any]:
        """The preference objective of the loaded recipe (ftkit.backend.objectives, `Preference.of(recipe.train)`):
        accumulate gradients of `scale * sum over pairs of the pair loss` and return the sums over the batch's pairs of
        "loss" and every metric of `Preference.metric_names` (device scalars or floats, as `forward_backward`).
        The policy runs with dropout as in training; the reference (DPO) without gradients or dropout."""

    def sequence_logps(self, batch: PairBatch, reference: bool = False) -> "np.ndarray":
        """Each sequence's sum of target-token log-probabilities, float64 [2 x pairs], no gradients, no dropout;
        `reference`: under the reference that `set_reference` set (validation and `ftkit eval`)."""

    def optimizer_step(self, lr: float, skip_nonfinite: bool = False) -> dict[str, Any]:
        """Clip, step at `lr`, zero the gradients; return e.g. {"grad_norm": ...} (floats or device scalars).

        `skip_nonfinite` (train.on_nonfinite = "skip"): when the gradients hold a NaN or inf, zero them and
        leave the weights and the optimizer state as they are, as a loss scaler does; the stats then carry
        "skipped": a host bool, True for such a step (one host sync a step, only in this mode)."""

    def trainable_finite(self) -> bool:
        """True when every trainable tensor holds finite values only, over all processes (every process
        calls it). Checked before a checkpoint or the final adapter is written: a reduction on the device."""

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

    def quantize_folder(self, src: Path, dest: Path, bits: int, group_size: int) -> None:
        """Write the model folder `src` to the empty folder `dest`, weights quantized in this backend's
        on-disk format (`bits` per weight, one scale per `group_size`), tokenizer files copied. Needs no
        `load`: `ftkit convert --quantize` calls it on a fresh backend. A backend that quantizes only at
        load time (`model.quantize`) raises FtkitError saying so."""

    def gemm_flops(self, shapes: list[tuple[int, int, int]], dtype: str, seconds: float) -> float:
        """The best FLOP/s that `(m, k) @ (k, n)` matrix products of these shapes reach in `dtype` ("float32",
        "bfloat16", "float16") on the device this backend trains on, measured in about `seconds`: the peak
        ftkit.backend.peak measures MFU against where no datasheet figure is known. Needs no `load`."""
