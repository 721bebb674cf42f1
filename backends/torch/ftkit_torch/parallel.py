"""DDP and FSDP2: joining the process group, wrapping the model, saving what the processes share.

accelerate starts the processes (`ftkit launch` runs `accelerate launch`) and its `PartialState`
joins them into a process group: NCCL on GPUs, gloo on CPUs. The wrapping is torch's own: DDP, or
FSDP2's `fully_shard` on every decoder layer and then on the whole model. accelerate's FSDP plugin
is not used because on a CPU it does not shard (FSDP1 errors, FSDP2 falls back to DDP), so the CPU
tests would not run the sharding code that runs on GPUs; with `fully_shard` they do.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ftkit.common.distributed import World
from ftkit.common.errors import FtkitError


def join(world: World, device_type: str) -> torch.device:
    """Join the run's process group; return this process's device."""
    from accelerate import PartialState

    # cpu=True is what makes accelerate use gloo where there is no GPU, instead of quietly running one process.
    state = PartialState(cpu=device_type == "cpu")
    if state.num_processes != world.size:
        raise FtkitError(f"the launcher started {world.size} processes, but accelerate joined {state.num_processes}; "
                         "start multi-process runs with `ftkit launch` (or torchrun).")
    return torch.device("cuda", world.local_rank) if device_type == "cuda" else torch.device("cpu")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: the classes transformers names in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise FtkitError(f"FSDP: {type(base).__name__} names no decoder-layer class (_no_split_modules); "
                         "use torch.distributed = 'ddp' for this model.")
    return layers


def wrap(model, kind: str, device: torch.device):
    """The module the training forward goes through: a DDP wrapper, or `model` itself, sharded in place."""
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def gathered_state_dict(model, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full tensors of a sharded model on the first process (empty elsewhere); every process must call it.

    For an adapter only the trainable tensors travel: gathering a 70B base to save 40 MB of LoRA would
    be absurd.
    """
    if not trainable_only:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            if dist.get_rank() == 0:
                out[name] = full.detach().cpu()
    return out


def save_optimizer(model, optimizer, dest: Path) -> None:
    """Each process writes its shard (torch.distributed.checkpoint); a later run may use another process count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=dest)


def load_optimizer(model, optimizer, src: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=src)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    dist.barrier()
