"""The torch backend's memory and speed switches on the CPU: mixed precision (fp32 master weights for
what trains, loss scaling for fp16), gradient checkpointing, attention kernel, torch.compile. Each is
checked against the plain fp32 run, and the run log must say which switches were on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from builders import recipe_file  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from ftkit.recipe.load import load_recipes
from ftkit.train.loop import Trainer
from ftkit.train.prepare import prepare

TRAIN = {"iters": 4, "save_every": 4, "steps_per_eval": 4, "lr": 1e-2}


def run(tmp_path: Path, model: Path, data: Path, name: str, **torch_keys):
    p = recipe_file(tmp_path, model, data, name, train=TRAIN, torch={"precision": "fp32", **torch_keys})
    (recipe,) = load_recipes([p])
    trainer = Trainer(prepare(recipe), "torch", quiet=True)
    result = trainer.run()
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, result, records


@pytest.fixture
def plain(tmp_path, tiny_model_dir, small_data):
    return run(tmp_path, tiny_model_dir, small_data, "plain")


def train_losses(records) -> list[float]:
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_the_run_log_names_the_switches(plain):
    _, result, records = plain
    (run_record,) = [r for r in records if r["kind"] == "run"]
    assert run_record["switches"] == result.info["switches"] == {
        "precision": "fp32", "loss scaling": "off", "gradient checkpointing": "off", "torch.compile": "off",
        "attention": "sdpa", "optimizer": "adamw", "distributed": "none"}
    meta = json.loads((result.adapter / "ftkit.json").read_text())
    assert meta["switches"] == result.info["switches"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(tmp_path, tiny_model_dir, small_data, plain, precision):
    trainer, result, records = run(tmp_path, tiny_model_dir, small_data, precision, precision=precision)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    params = dict(trainer.backend.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)  # what the optimizer updates
    assert params["base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"].dtype == half  # the frozen base
    switches = result.info["switches"]
    assert switches["precision"] == f"{precision} autocast"
    assert switches["loss scaling"] == ("on" if precision == "fp16" else "off")
    scales = [r.get("loss_scale") for r in records if r["kind"] == "train"]
    assert all(s and s > 1 for s in scales) if precision == "fp16" else not any(scales)
    # Close to the fp32 run (the half-precision base costs ~1e-3 relative here), and it trains.
    np.testing.assert_allclose(train_losses(records), train_losses(plain[2]), rtol=5e-3)
    assert result.last_valid_loss < result.first_valid_loss - 0.02


def test_fp16_loss_scaling_state_resumes(tmp_path, tiny_model_dir, small_data):
    p = recipe_file(tmp_path, tiny_model_dir, small_data, "fp16r", train={**TRAIN, "save_every": 2}, torch={"precision": "fp16"})
    (recipe,) = load_recipes([p])
    Trainer(prepare(recipe), "torch", quiet=True).run(stop_after=2)
    trainer = Trainer(prepare(recipe), "torch", quiet=True)
    trainer.run(resume="auto")
    saved = torch.load(next((tmp_path / "run-fp16r" / "checkpoints").glob("step-*")) / "state" / "torch_state.pt", weights_only=False)
    assert saved["scaler"]["scale"] > 1
    assert trainer.backend.scaler.get_scale() > 1


def test_gradient_checkpointing_and_eager_attention_change_nothing_but_memory(tmp_path, tiny_model_dir, small_data, plain):
    ref = load_file(str(plain[1].adapter / "adapter_model.safetensors"))
    for name, keys in (("gc", {"gradient_checkpointing": True}), ("eager", {"attn_implementation": "eager"})):
        _, result, records = run(tmp_path, tiny_model_dir, small_data, name, **keys)
        assert result.info["switches"][{"gc": "gradient checkpointing", "eager": "attention"}[name]] == ("on" if name == "gc" else "eager")
        np.testing.assert_allclose(train_losses(records), train_losses(plain[2]), rtol=1e-5)
        got = load_file(str(result.adapter / "adapter_model.safetensors"))
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], atol=1e-5, err_msg=f"{name}: {k}")


@pytest.mark.slow
def test_torch_compile_trains_the_same(tmp_path, tiny_model_dir, small_data, plain):
    _, result, records = run(tmp_path, tiny_model_dir, small_data, "compiled", compile=True)
    assert result.info["switches"]["torch.compile"] == "on"
    np.testing.assert_allclose(train_losses(records), train_losses(plain[2]), rtol=1e-4)


def test_a_distributed_recipe_in_one_process_trains_unwrapped_and_says_so(tmp_path, tiny_model_dir, small_data, plain):
    # the recipe of a multi-GPU job, tried on one GPU first with `ftkit train`
    _, result, records = run(tmp_path, tiny_model_dir, small_data, "one", distributed="fsdp")
    assert result.info["switches"]["distributed"] == "fsdp asked, 1 process: not wrapped"
    np.testing.assert_allclose(train_losses(records), train_losses(plain[2]), rtol=1e-6)
