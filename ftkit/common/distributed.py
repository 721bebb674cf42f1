"""Which process of a multi-process run this is, how the step's work is split, and `ftkit launch`.

The launcher is accelerate's (`accelerate launch`, itself torchrun underneath): it starts the
processes and sets RANK / WORLD_SIZE / LOCAL_RANK. The core reads those, so that it can decide what
each process trains on and which one writes the run folder, without importing torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This process's part of a list that every process builds alike: items rank, rank + size, ..."""
        return items[self.rank :: self.size]


def current() -> World:
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def launch_command(
    train_args: list[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
    main_address: str = "127.0.0.1", main_port: int = 29500,
) -> list[str]:
    """The `accelerate launch` line that runs `ftkit train <train_args>` in every process.

    `--multi_gpu` is accelerate's switch for "more than one process through torchrun"; on a machine
    without GPUs the processes find no CUDA and fall back to gloo on the CPU (that is how the tests
    run it). accelerate's `--cpu` flag is not used: with accelerate 1.15 it silently starts one process.
    Every value is passed explicitly so that a stray `accelerate config` file cannot change the run.
    """
    total = nproc_per_node * nnodes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(total),
           "--num_machines", str(nnodes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if total > 1:
        cmd.append("--multi_gpu")
    if nnodes > 1:
        cmd += ["--machine_rank", str(node_rank), "--main_process_ip", main_address, "--main_process_port", str(main_port)]
    else:
        cmd += ["--main_process_port", str(main_port)]
    return cmd + ["-m", "ftkit.cli", "train", *train_args]


def shared_dir_check(path: Path) -> str | None:
    """Why `path` (created by rank 0 a moment ago) is not usable here, or None."""
    if path.is_dir():
        return None
    return (f"{path} is not visible from this process (rank {current().rank}): output.dir must be on a filesystem "
            "every node shares (a network volume or NFS), because each process writes its shard of a checkpoint there.")
