"""Optimizers with the torch backend's arithmetic, so one recipe means one update on both backends.

torch's AdamW bias-corrects and decays only matrices (norms, biases and DoRA magnitudes are not
decayed, as the torch backend's parameter groups do); mlx's AdamW does neither by default. So the
decay is applied here, to tensors with two or more dimensions, and the step is mlx's Adam with
bias correction.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ftkit.common.errors import FtkitError
from ftkit.recipe.schema import TrainSection

CUDA_ONLY = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit")


def build(train: TrainSection) -> optim.Optimizer:
    betas = [train.beta1, train.beta2]
    if train.optimizer in ("adamw", "adam"):
        return optim.Adam(learning_rate=train.lr, betas=betas, eps=1e-8, bias_correction=True)
    if train.optimizer == "sgd":
        return optim.SGD(learning_rate=train.lr, momentum=train.beta1)
    if train.optimizer == "adafactor":
        return optim.Adafactor(learning_rate=train.lr, relative_step=False, scale_parameter=False)
    if train.optimizer in CUDA_ONLY:
        raise FtkitError(
            f"train.optimizer = '{train.optimizer}' is a bitsandbytes optimizer (CUDA only); on the MLX backend use "
            "'adamw', 'sgd' or 'adafactor'."
        )
    raise FtkitError(f"train.optimizer = '{train.optimizer}' is not available on the MLX backend.")


def apply_weight_decay(train: TrainSection, params: dict, grads: dict, decay: float | mx.array) -> tuple[dict, dict]:
    """Decoupled decay (adam/adamw, as the torch backend's AdamW; adafactor) shrinks the matrices by `decay`
    (1 - lr * weight_decay: a Python float, or a float32 scalar inside a compiled update, where the learning
    rate must not be a traced constant); for SGD it is L2 added to the gradient, as torch does."""
    wd = train.weight_decay
    if not wd:
        return params, grads
    if train.optimizer == "sgd":
        return params, tree_map(lambda g, p: g + wd * p if p.ndim >= 2 else g, grads, params)
    if isinstance(decay, mx.array):
        return tree_map(lambda p: p * decay.astype(p.dtype) if p.ndim >= 2 else p, params), grads
    return tree_map(lambda p: p * decay if p.ndim >= 2 else p, params), grads


def global_norm(grads: dict) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))
