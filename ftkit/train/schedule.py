"""Epochs and proportions -> concrete step counts, and the learning-rate schedule.

One step is one optimizer update: `batch_size * grad_accum` training examples in each of the run's
processes (`batch_size * grad_accum * processes` in all). The proportion keys
keep mlx-tuning-fork's meaning; explicit step counts (`steps_per_eval` ...) win over them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ftkit.recipe.schema import TrainSection


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: int
    steps_per_report: int
    steps_per_eval: int
    val_batches: int | None  # None: the whole validation set
    save_every: int
    warmup_steps: int
    examples_per_step: int

    def as_dict(self) -> dict:
        return asdict(self)

    def is_report(self, step: int) -> bool:
        return step % self.steps_per_report == 0 or step == self.total_steps

    def is_eval(self, step: int) -> bool:
        return step % self.steps_per_eval == 0 or step == self.total_steps

    def is_save(self, step: int) -> bool:
        return step % self.save_every == 0 and step != self.total_steps


def make_schedule(train: TrainSection, n_train: int, n_valid: int, processes: int = 1) -> Schedule:
    per_step = train.batch_size * train.grad_accum * processes
    epoch_steps = max(1, math.ceil(n_train / per_step))
    if train.iters is not None:
        total = train.iters
    else:
        total = max(1, math.ceil(epoch_steps * (train.epochs or 1.0)))

    val_batches: int | None
    if train.evals_per_epoch:
        steps_per_eval = int(epoch_steps / train.evals_per_epoch)
        val_batches = (
            int(n_valid * train.eval_proportion_of_total / train.batch_size)
            if train.eval_proportion_of_total
            else None
        )
    else:
        steps_per_eval = int(total * train.validation_interval_proportion)
        val_batches = (
            int(train.validations_per_train_item * train.validation_interval_proportion * total)
            if train.validations_per_train_item
            else None
        )
    if train.saves_per_epoch:
        save_every = int(epoch_steps / train.saves_per_epoch)
    else:
        save_every = int(total * train.adapter_save_interval_proportion)
    steps_per_report = int(total * train.reporting_interval_proportion)

    warmup = train.warmup if train.warmup >= 1 else train.warmup * total
    return Schedule(
        total_steps=total,
        steps_per_epoch=epoch_steps,
        steps_per_report=max(1, train.steps_per_report or steps_per_report),
        steps_per_eval=max(1, train.steps_per_eval or steps_per_eval),
        val_batches=train.val_batches or (max(1, val_batches) if val_batches is not None else None),
        save_every=max(1, train.save_every or save_every),
        warmup_steps=min(total, int(round(warmup))),
        examples_per_step=per_step,
    )


def lr_at(step: int, train: TrainSection, schedule: Schedule) -> float:
    """LR for optimizer step `step` (1-based): linear warmup, then constant / linear / cosine decay."""
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    warm = schedule.warmup_steps
    if step <= warm:
        return peak * step / warm
    if train.scheduler == "constant":
        return peak
    # Counted from the first post-warmup step, so that no step is spent at the floor LR.
    progress = min(1.0, (step - 1 - warm) / max(1, schedule.total_steps - warm))
    if train.scheduler == "linear":
        return floor + (peak - floor) * (1 - progress)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
