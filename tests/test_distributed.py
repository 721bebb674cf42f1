"""Several processes on the CPU (gloo), started as a user starts them: `ftkit launch`, i.e. accelerate.

The sharding code is the one that runs on GPUs (DDP, FSDP2's fully_shard); only the process-group
backend differs. Each multi-process run is checked against one process on the same global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from builders import PYTHONPATH, recipe_file  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from ftkit.common.distributed import World, launch_command
from ftkit.recipe.load import load_recipes
from ftkit.train.loop import Trainer
from ftkit.train.prepare import prepare

# Per process: micro-batches of 2, one per step; one process: 2 micro-batches of 2 per step. Same
# 4 examples per step, same order, same padding; constant LR so that a run stopped and resumed
# follows the same schedule.
TRAIN = {"iters": 4, "batch_size": 2, "grad_accum": 1, "lr": 1e-2, "scheduler": "constant", "warmup": 0,
         "steps_per_eval": 2, "steps_per_report": 1, "save_every": 2, "val_batches": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe: Path, *args: str, timeout: int = 240) -> str:
    """`ftkit launch RECIPE ARGS` to completion; what it printed (stdout and stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "PYTHONPATH": PYTHONPATH}
    cmd = [sys.executable, "-m", "ftkit.cli", "launch", str(recipe), "--main-port", str(free_port()), *args]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stdout[-4000:]
    return out.stdout


def one_process(recipe: Path, run_dir: Path, *sets: str) -> Path:
    """The same global batch in one process: twice the micro-batches per step."""
    (r,) = load_recipes([recipe])
    (r,) = load_recipes([recipe], ["torch.distributed=none", f"train.grad_accum={2 * r.train.grad_accum}", f"output.dir={run_dir}", *sets])
    return Trainer(prepare(r), "torch", quiet=True).run().adapter


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta and ta.keys() == tb.keys()
    assert any(np.abs(v).max() > 0 for k, v in tb.items() if "lora_B" in k)  # trained, not the zero init
    for k in ta:
        np.testing.assert_allclose(tb[k], ta[k], rtol=0, atol=1e-6, err_msg=k)


def valid_losses(run_dir: Path) -> list[tuple[int, float]]:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "valid"]


def test_ddp_on_two_processes_equals_one_process(tmp_path, tiny_model_dir, small_data):
    # Two padded micro-batches per process and step: the first under DDP's no_sync, one all-reduce per
    # step. The gradient sums then differ from one process's in float order (~1e-7): SGD keeps that
    # at 1e-7 in the adapter, where AdamW would magnify it for gradients near zero.
    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, train={**TRAIN, "grad_accum": 2, "optimizer": "sgd", "lr": 0.5},
                         data={"packing": "off"},
                         torch={"precision": "fp32", "distributed": "ddp"})
    out = launch(recipe, "--nproc-per-node", "2")
    assert "distributed ddp x2" in out and "2 processes x 4" in out
    assert out.count("step 2: validation loss") == 1  # only the first process prints
    run = tmp_path / "run-r"
    single = one_process(recipe, tmp_path / "single")
    assert_same_adapter(single, run / "adapter")
    assert [s for s, _ in valid_losses(run)] == [0, 2, 4]  # one process writes the log, once per event
    np.testing.assert_allclose([v for _, v in valid_losses(run)], [v for _, v in valid_losses(tmp_path / "single")], rtol=1e-6)


def test_fsdp_shards_checkpoints_resumes_and_equals_one_process(tmp_path, tiny_model_dir, small_data):
    # Packed (the default): each process packs its share of the step, so its gradient sums differ from
    # one process's in float order; SGD (with momentum: optimizer state to shard and resume) keeps that
    # at 1e-7 in the adapter.
    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, train={**TRAIN, "grad_accum": 2, "optimizer": "sgd", "lr": 0.5},
                         torch={"precision": "fp32", "distributed": "fsdp"})
    run = tmp_path / "run-r"
    first = launch(recipe, "--nproc-per-node", "2", "--stop-after", "3")
    assert "stopped r after step 3 of 4" in first
    state = run / "checkpoints" / "step-000003" / "state"
    assert sorted(p.name for p in (state / "optimizer").iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    assert (state / "rank0.pt").exists() and (state / "rank1.pt").exists()
    second = launch(recipe, "--nproc-per-node", "2", "--resume", "auto")
    assert "resumed from" in second and "distributed fsdp x2" in second
    assert_same_adapter(one_process(recipe, tmp_path / "single"), run / "adapter")
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]


def test_fsdp_qlora_with_a_bitsandbytes_optimizer_equals_one_process(tmp_path, tiny_model_dir, small_data):
    # bitsandbytes' kernels know no DTensor: ftkit steps each process's local shards (optim.LocalShards).
    # Padded micro-batches, one per process: the same float sums as one process's two, so the 8-bit
    # AdamW state (which magnifies any float difference) matches to 1e-6.
    sets = {"model": {"quantize": "nf4"}, "train": {**TRAIN, "optimizer": "paged_adamw_8bit"}, "data": {"packing": "off"}}
    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, **sets, torch={"precision": "fp32", "distributed": "fsdp"})
    out = launch(recipe, "--nproc-per-node", "2")
    assert "quantization nf4" in out
    assert_same_adapter(one_process(recipe, tmp_path / "single"), tmp_path / "run-r" / "adapter")


def test_two_nodes_rendezvous_on_localhost(tmp_path, tiny_model_dir, small_data):
    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, train={**TRAIN, "iters": 2},
                         torch={"precision": "fp32", "distributed": "ddp"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "ftkit.cli", "launch", str(recipe), "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--main-address", "127.0.0.1", "--main-port", port],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for rank in (0, 1)]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "distributed ddp x2" in outs[0] and "done r: 2 steps" in outs[0]
    assert "done r" not in outs[1]  # the second node's process is rank 1: it trains but does not report
    assert (tmp_path / "run-r" / "adapter" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------- no processes started


def test_launch_refuses_a_recipe_without_a_distributed_mode(tmp_path, tiny_model_dir, small_data):
    recipe = recipe_file(tmp_path, tiny_model_dir, small_data)
    out = subprocess.run([sys.executable, "-m", "ftkit.cli", "launch", str(recipe), "--nproc-per-node", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "torch.distributed = 'none' cannot use 2 processes" in out.stderr + out.stdout
    assert not (tmp_path / "run-r").exists()


def test_launch_command_for_three_nodes_of_four_gpus():
    cmd = launch_command(["r.toml", "--backend", "torch"], nproc_per_node=4, nnodes=3, node_rank=2,
                         main_address="10.0.0.1", main_port=29501)
    line = " ".join(cmd)
    assert "-m accelerate.commands.launch --num_processes 12 --num_machines 3" in line
    assert "--multi_gpu --machine_rank 2 --main_process_ip 10.0.0.1 --main_process_port 29501" in line
    assert line.endswith("-m ftkit.cli train r.toml --backend torch")


def test_each_process_gets_its_share_of_the_step():
    items = list(range(6))
    assert World(0, 2).share(items) == [0, 2, 4] and World(1, 2).share(items) == [1, 3, 5]
    assert World().share(items) == items


def test_a_checkpoint_is_resumed_only_by_as_many_processes(tmp_path, tiny_model_dir, small_data):
    import json

    from ftkit.common.errors import FtkitError

    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, train=TRAIN)
    (r,) = load_recipes([recipe])
    Trainer(prepare(r), "torch", quiet=True).run(stop_after=2)
    state_file = tmp_path / "run-r" / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))  # as a 2-process run writes it
    with pytest.raises(FtkitError, match="written by a run of 2 process.*resume it with 2 .this run has 1."):
        Trainer(prepare(r), "torch", quiet=True).run(resume="auto")
