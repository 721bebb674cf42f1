"""Optimizers for the trainable parameters; the learning rate is set by the core every step."""

from __future__ import annotations

import warnings

import torch

from ftkit.common.errors import FtkitError
from ftkit.recipe.schema import TrainSection

# Paging moves optimizer state between GPU and CPU memory under pressure; on a CPU there is nothing
# to page, so the same arithmetic runs unpaged.
_UNPAGED = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw", "paged_lion_8bit": "lion_8bit"}


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
    name = train.optimizer
    if name in _UNPAGED and device.type != "cuda":
        warnings.warn(f"train.optimizer = '{name}' pages state to the CPU under GPU memory pressure; on {device.type} "
                      f"ftkit runs '{_UNPAGED[name]}' instead (the same update, unpaged).", stacklevel=2)
        name = _UNPAGED[name]
    if name in ("adamw", "adam"):
        return torch.optim.AdamW(groups, lr=train.lr, betas=betas, foreach=device.type == "cuda")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.beta1)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # An external LR (the core's schedule), as MLX's Adafactor is run: no relative step, no parameter scaling.
        return Adafactor(groups, lr=train.lr, relative_step=False, scale_parameter=False, warmup_init=False)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise FtkitError(f"train.optimizer = '{name}' needs bitsandbytes: pip install bitsandbytes") from None

    classes = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_lion_8bit": bnb.optim.PagedLion8bit,
               "lion_8bit": bnb.optim.Lion8bit}
    if name not in classes:
        raise FtkitError(f"train.optimizer = {name!r} is not available on the torch backend.")
    if any(hasattr(p, "to_local") for p in params):
        return LocalShards(classes[name], groups, lr=train.lr, betas=betas)
    return classes[name](groups, lr=train.lr, betas=betas)


class LocalShards:
    """A bitsandbytes optimizer stepping each process's own shards of FSDP2's DTensor parameters.

    bitsandbytes' kernels have no DTensor rules ("does not have a sharding strategy registered"), but
    AdamW and Lion update every element on its own, so updating each local shard is the same update.
    The local tensors share storage with the shards (and, once `take_grads` ran, with their
    gradients), so in-place work on either side is seen by the other.
    """

    def __init__(self, cls, groups, **kwargs):
        self.sharded = [p for g in groups for p in g["params"]]
        with torch.no_grad():
            self.local = {id(p): p.to_local().detach() for p in self.sharded}
        local_groups = [{**g, "params": [self.local[id(p)] for p in g["params"]]} for g in groups]
        self.inner = cls(local_groups, **kwargs)
        self.param_groups = self.inner.param_groups

    def take_grads(self) -> None:
        for p in self.sharded:
            self.local[id(p)].grad = None if p.grad is None else p.grad.to_local()

    def step(self) -> None:
        self.take_grads()
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.sharded:
            p.grad = None
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
