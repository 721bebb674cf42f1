"""Optimizers for the trainable parameters; the learning rate is set by the core every step."""

from __future__ import annotations

import torch

from ftkit.errors import FtkitError
from ftkit.recipe import TrainSection


def build_optimizer(model, train: TrainSection, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FtkitError("the model has no trainable parameters: check method.targets and method.layers.")
    # Norms and biases are not decayed (the usual AdamW practice).
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (train.beta1, train.beta2)
    if train.optimizer in ("adamw", "adam"):
        return torch.optim.AdamW(groups, lr=train.lr, betas=betas, foreach=device.type == "cuda")
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.beta1)
    raise FtkitError(
        f"train.optimizer = {train.optimizer!r} is not available on the torch backend yet; use 'adamw' or 'sgd'."
    )
