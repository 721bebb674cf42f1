"""The core loop on the MLX backend (mlx[cpu] here, Metal on a Mac): what it trains, keeps, resumes and refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from builders import recipe_file, train_hiding  # noqa: E402

from ftkit.common.errors import FtkitError
from ftkit.common.tensors import read_safetensors
from ftkit.recipe.load import load_recipes
from ftkit.train.loop import Trainer
from ftkit.train.prepare import prepare


def run(path: Path, backend: str = "mlx", resume=None, stop_after=None, sets=()):
    (recipe,) = load_recipes([path], list(sets))
    return Trainer(prepare(recipe), backend, quiet=True).run(resume=resume, stop_after=stop_after)


def adapter(folder: Path) -> dict[str, np.ndarray]:
    return read_safetensors(folder / "adapter_model.safetensors")


def test_trains_without_torch_installed(tmp_path, tiny_model_dir, small_data):
    """A Mac with only `ftkit[mlx]`: the whole run (tokenizer, data, MLX, adapter, plot) never needs torch."""
    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 2, "save_every": 2})
    result = train_hiding(p, "mlx", ["torch"])
    assert result["backend"] == "mlx" and result["steps"] == 2
    assert json.loads((Path(result["adapter"]) / "ftkit.json").read_text())["backend"] == "mlx"


def test_base_stays_frozen_and_only_the_adapter_trains(tmp_path, tiny_model_dir, small_data):
    from mlx.utils import tree_flatten

    from ftkit.backend.registry import get_backend

    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 3, "save_every": 3})
    (recipe,) = load_recipes([p])
    trainer = Trainer(prepare(recipe), "mlx", quiet=True)
    result = trainer.run()
    be = trainer.backend
    assert isinstance(be, type(get_backend("mlx")))
    base = read_safetensors(tiny_model_dir / "model.safetensors")
    params = dict(tree_flatten(be.tuned.model.parameters()))
    frozen = {k.replace(".linear.", "."): v for k, v in params.items() if not k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    assert sorted(frozen) == sorted(base)
    for name, value in base.items():
        assert np.array_equal(np.array(frozen[name]), value), name  # bit for bit: the base did not move
    saved = adapter(result.adapter)
    # rank 4 x (in + out) over q 64->64, k 64->32, v 64->32, o 64->64, gate/up 64->128, down 128->64, in 2 blocks
    assert result.info["trainable_params"] == sum(v.size for v in saved.values()) == 2 * 4 * (128 + 96 + 96 + 128 + 3 * 192)
    assert any(np.abs(v).max() > 0 for k, v in saved.items() if "lora_B" in k)  # B moved off zero: it trained


def test_full_fine_tune_is_a_model_folder_not_an_adapter(tmp_path, tiny_model_dir, small_data):
    p = recipe_file(tmp_path, tiny_model_dir, small_data, method={"kind": "full"}, train={"iters": 2, "save_every": 2, "lr": 1e-3})
    res = run(p)
    assert not (res.adapter / "adapter_config.json").exists()
    assert (res.adapter / "config.json").exists() and (res.adapter / "tokenizer.json").exists()
    base, tuned = read_safetensors(tiny_model_dir / "model.safetensors"), read_safetensors(res.adapter / "model.safetensors")
    assert sorted(base) == sorted(tuned)
    assert sum(not np.array_equal(base[k], tuned[k]) for k in base) == len(base)  # every tensor trained
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(res.adapter)  # transformers reads what MLX wrote


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path, tiny_model_dir, small_data):
    """Optimizer state, data position and the dropout RNG all come back (mlx-lm resumes weights only)."""
    keys = {"method": {"dropout": 0.1}, "train": {"iters": 6, "save_every": 2}}
    whole = run(recipe_file(tmp_path, tiny_model_dir, small_data, name="whole", **keys))
    p = recipe_file(tmp_path, tiny_model_dir, small_data, name="cut", **keys)
    run(p, stop_after=3)  # as if preempted after step 3 (the last checkpoint is step 2... and the stop writes step 3)
    resumed = run(p, resume="auto")
    assert resumed.resumed_from and resumed.steps == 6
    a, b = adapter(whole.adapter), adapter(resumed.adapter)
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-6
    assert resumed.last_valid_loss == pytest.approx(whole.last_valid_loss, rel=1e-6)


def test_gradient_accumulation_is_token_weighted(tmp_path, tiny_model_dir, small_data):
    """4 examples in one micro-batch or in two of 2: the same step, because each token weighs the same.

    (mlx-lm's trainer averages per-micro-batch means, which gives short examples more weight.)
    """
    one = run(recipe_file(tmp_path, tiny_model_dir, small_data, name="one", train={"iters": 3, "batch_size": 4, "grad_accum": 1, "save_every": 3}))
    two = run(recipe_file(tmp_path, tiny_model_dir, small_data, name="two", train={"iters": 3, "batch_size": 2, "grad_accum": 2, "save_every": 3}))
    a, b = adapter(one.adapter), adapter(two.adapter)
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-5


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_model_dir, small_data):
    plain = run(recipe_file(tmp_path, tiny_model_dir, small_data, name="plain", train={"iters": 2, "save_every": 2}))
    ckpt = run(recipe_file(tmp_path, tiny_model_dir, small_data, name="ck", train={"iters": 2, "save_every": 2},
                           mlx={"gradient_checkpointing": True}))
    assert ckpt.last_train_loss == pytest.approx(plain.last_train_loss, rel=1e-5)


# ---------------------------------------------------------------- QLoRA

def test_qlora_quantizes_the_base_on_load(tmp_path, tiny_model_dir, small_data):
    p = recipe_file(tmp_path, tiny_model_dir, small_data, model={"quantize": "4bit"}, mlx={"quantize_group_size": 32},
                    train={"iters": 6, "save_every": 6})
    res = run(p)
    assert res.info["quantization"] == "4-bit, group size 32"
    assert res.info["trainable_params"] == sum(v.size for v in adapter(res.adapter).values())
    assert res.last_valid_loss < res.first_valid_loss


def test_a_converted_4bit_model_is_used_as_it_is(tmp_path, tiny_model_dir, small_data):
    from ftkit.evaluate.evaluation import evaluate_recipe
    from ftkit.ops.fuse import fuse
    from ftkit.ops.quantize import quantize_mlx

    q4 = quantize_mlx(tiny_model_dir, tmp_path / "q4", bits=4, group_size=32)
    cfg = json.loads((q4 / "config.json").read_text())
    assert (cfg["quantization"]["bits"], cfg["quantization"]["group_size"]) == (4, 32)
    assert (q4 / "model.safetensors").stat().st_size < (tiny_model_dir / "model.safetensors").stat().st_size / 3
    p = recipe_file(tmp_path, q4, small_data, train={"iters": 4, "save_every": 4})
    res = run(p)
    assert res.info["quantization"] == "4-bit, group size 32"
    (recipe,) = load_recipes([p])
    with pytest.raises(FtkitError, match="quantized in MLX's format"):
        evaluate_recipe(recipe, "torch", res.adapter, compare=False)
    loss = evaluate_recipe(recipe, "mlx", res.adapter, compare=False)["loss"]
    # fuse onto the 4-bit base, dequantized: a plain float model that transformers loads
    fuse(res.adapter, tmp_path / "fused", model=None, backend_name="mlx", dequantize=True, force=False)
    fused_cfg = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in fused_cfg and "quantization_config" not in fused_cfg
    recipe.model.path = str(tmp_path / "fused")
    assert evaluate_recipe(recipe, "torch", None)["loss"] == pytest.approx(loss, rel=1e-3)


# ---------------------------------------------------------------- keys a backend cannot honour

@pytest.mark.parametrize("sets, backend, message", [
    (["method.kind=prefix"], "mlx", "'prefix' is not available on the MLX backend"),
    (["model.quantize=nf4"], "mlx", "bitsandbytes format.*use '4bit' or '8bit'"),
    (["train.optimizer=paged_adamw_8bit"], "mlx", "CUDA only"),
])
def test_unsupported_keys_are_errors_before_training(tmp_path, tiny_model_dir, small_data, sets, backend, message):
    p = recipe_file(tmp_path, tiny_model_dir, small_data)
    with pytest.raises(FtkitError, match=message):
        run(p, backend=backend, sets=sets)
    assert not (tmp_path / "run-r" / "checkpoints").exists()


def test_the_other_backends_section_is_reported_not_silently_dropped(tmp_path, tiny_model_dir, small_data, capsys):
    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 1, "save_every": 1}, torch={"precision": "bf16", "compile": True})
    (recipe,) = load_recipes([p])
    Trainer(prepare(recipe), "mlx").run()
    err = capsys.readouterr()
    assert "not used on mlx: torch.precision = 'bf16', torch.compile = True" in err.out + err.err


def test_cli_generate_and_fuse_on_mlx(tmp_path, tiny_model_dir, small_data):
    from typer.testing import CliRunner

    from ftkit.cli import app

    res = run(recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 2, "save_every": 2}))
    cli = CliRunner()
    out = cli.invoke(app, ["generate", "--model", str(tiny_model_dir), "--prompt", "Q: how many", "--adapter", str(res.adapter),
                           "--max-tokens", "5", "--backend", "mlx", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["backend"] == "mlx"
    out = cli.invoke(app, ["fuse", "--adapter", str(res.adapter), "--out", str(tmp_path / "f"), "--backend", "mlx", "--json"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "f" / "model.safetensors").exists() and (tmp_path / "f" / "tokenizer.json").exists()
    out = cli.invoke(app, ["fuse", "--adapter", str(res.adapter), "--out", str(tmp_path / "f"), "--backend", "mlx", "--json"])
    assert out.exit_code == 2 and "--force" in json.loads(out.stdout)["error"]
    out = cli.invoke(app, ["convert", str(tiny_model_dir), "--quantize", "8", "--group-size", "32", "--out", str(tmp_path / "q8"), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8
    out = cli.invoke(app, ["convert", str(tiny_model_dir), "--json"])
    assert out.exit_code == 2 and "--quantize" in json.loads(out.stdout)["error"]


# ---------------------------------------------------------------- soft prompts

@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_soft_prompt_starts_from_the_init_text_embeddings(tmp_path, tiny_model_dir, small_data, tokenizer, backend):
    pytest.importorskip("torch")
    text = "SELECT the answer"
    p = recipe_file(tmp_path, tiny_model_dir, small_data, method={"kind": "prompt", "num_virtual_tokens": 7, "prompt_init_text": text})
    run(p, backend=backend, stop_after=0)  # writes the step-0 checkpoint: the adapter as initialised
    start = adapter(tmp_path / "run-r" / "checkpoints" / "step-000000" / "adapter")["prompt_embeddings"]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ids = (ids * 7)[:7]
    table = read_safetensors(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_allclose(start, table[ids], atol=1e-7)


def test_prompt_training_continues_from_a_prompt_adapter(tmp_path, tiny_model_dir, small_data):
    from ftkit.evaluate.evaluation import evaluate_recipe

    first = run(recipe_file(tmp_path, tiny_model_dir, small_data, name="a", method={"kind": "prompt", "num_virtual_tokens": 5},
                            train={"iters": 3, "save_every": 3, "lr": 3e-2}))
    p = recipe_file(tmp_path, tiny_model_dir, small_data, name="b", method={"kind": "prompt", "num_virtual_tokens": 5, "resume_from": str(first.adapter)},
                    train={"iters": 2, "save_every": 2, "val_batches": 4})
    second = run(p)
    (recipe,) = load_recipes([p])
    assert second.first_valid_loss == pytest.approx(evaluate_recipe(recipe, "mlx", first.adapter, "valid", compare=False)["loss"], rel=1e-5)
    wrong = recipe_file(tmp_path, tiny_model_dir, small_data, name="c", method={"kind": "prompt", "num_virtual_tokens": 9, "resume_from": str(first.adapter)})
    with pytest.raises(FtkitError, match="5 virtual tokens, but the recipe's method.num_virtual_tokens is 9"):
        run(wrong)
