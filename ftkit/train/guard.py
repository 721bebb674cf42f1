"""Nothing non-finite is ever saved: what a run says when its loss or weights stop being numbers.

The loop checks the loss window at every report and, before any checkpoint or the final adapter is
written, both the loss window and the trainable tensors themselves (a step's loss is computed before its
update: the weights the update produced are only seen by the next step). When either is not finite, nothing
is written and the run stops with this error; the newest complete checkpoint, from before, is the one
`--resume auto` picks.

With train.on_nonfinite = "skip", a step whose gradients are not finite is not applied (as a loss scaler
does); MAX_SKIPS_IN_A_ROW such steps in a row stop the run with this error too.
"""

from __future__ import annotations

import math
from pathlib import Path

from ftkit.common.errors import FtkitError
from ftkit.recipe.schema import TrainSection
from ftkit.train import checkpoint as ckpt

MAX_SKIPS_IN_A_ROW = 10


def lr_hint(lr: float) -> str:
    """3e4 reads like a typo of 3e-4: say so."""
    if lr < 1:
        return ""
    exponent = math.floor(math.log10(lr))
    guess = f": did you mean {lr / 10 ** (2 * exponent):g}?" if exponent > 0 else ""
    return f"; a learning rate of {lr:g} is far too large{guess}"


def nonfinite_error(first: int, last: int, what: str, train: TrainSection, run_dir: Path) -> FtkitError:
    steps = f"step {last}" if first >= last else f"steps {first}-{last}"
    latest = ckpt.latest_checkpoint(run_dir)
    where = (f"the newest complete checkpoint, {latest.name}, is from before, and --resume auto continues from it"
             if latest is not None else "no checkpoint was written yet, so --resume auto starts again from step 0")
    clip = f"train.max_grad_norm, now {train.max_grad_norm:g}" if train.max_grad_norm else "train.max_grad_norm = 1.0"
    skip = "" if train.on_nonfinite == "skip" else '; train.on_nonfinite = "skip" skips steps whose gradients are not finite'
    return FtkitError(
        f"{steps}: {what}. Nothing was saved from them: {where}. Lower train.lr (now {train.lr:g}{lr_hint(train.lr)}), "
        f"add warmup (train.warmup, now {train.warmup:g}), clip the gradients ({clip}), or check the data{skip}."
    )
