"""One recipe, two backends, one adapter format: the same numbers on MLX and on torch (and plain PEFT).

Everything runs for real on a config-built tiny Llama in fp32: MLX through mlx[cpu], torch on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import builders
from builders import recipe_file, wikisql_slice  # noqa: E402

from ftkit.backend.registry import get_backend
from ftkit.common.errors import AdapterMismatchError
from ftkit.common.tensors import read_safetensors
from ftkit.evaluate.evaluation import evaluate_recipe
from ftkit.evaluate.inference import load_for_inference
from ftkit.models.tokenizer import load_tokenizer
from ftkit.ops.fuse import fuse
from ftkit.recipe.load import build_recipe, load_recipes
from ftkit.train.loop import Trainer
from ftkit.train.prepare import prepare

METHODS = ["lora", "dora", "prompt"]
PROMPT = "table: 1-10015132-11\ncolumns: Player, No., Nationality\nQ: Which player wore number 4?\nA: SELECT"


def train(tmp_path: Path, model: Path, data: Path, backend: str, kind: str, iters: int = 20, **train_keys):
    method = {"kind": kind, "prompt_init_text": "Translate the question to SQL"} if kind == "prompt" else {"kind": kind}
    p = recipe_file(tmp_path, model, data, name=f"{kind}-{backend}", method=method,
                    train={"iters": iters, "save_every": 10, "lr": 1e-2, **train_keys})
    (recipe,) = load_recipes([p])
    result = Trainer(prepare(recipe), backend, quiet=True).run()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, [r["loss"] for r in rows if r["kind"] == "train"], p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, wikisql_dir):
    """Each method trained 20 steps on each backend from the same recipe and seed."""
    tmp = tmp_path_factory.mktemp("cross")
    data = wikisql_slice(tmp / "data", train=48, valid=16, test=16)
    out = {}
    for kind in METHODS:
        for backend in ("torch", "mlx"):
            out[kind, backend] = train(tmp, tiny_model_dir, data, backend, kind)
    return out


def token_ids(model_dir: Path) -> list[int]:
    return load_tokenizer(model_dir)(PROMPT).input_ids


def logits_on(backend_name: str, model_dir: Path, adapter: Path | None) -> np.ndarray:
    return builders.logits_on(backend_name, model_dir, adapter, PROMPT)


def peft_logits(model_dir: Path, adapter: Path) -> np.ndarray:
    """Plain transformers + PEFT, no ftkit code in the path."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(adapter))
    model.eval()
    n_virtual = model.peft_config["default"].num_virtual_tokens if model.peft_config["default"].is_prompt_learning else 0
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids(model_dir)])).logits[0, n_virtual:].numpy()


@pytest.mark.parametrize("kind", METHODS)
def test_same_initial_adapter_and_losses_over_20_steps(trained, kind):
    (res_t, loss_t, _), (res_m, loss_m, _) = trained[kind, "torch"], trained[kind, "mlx"]
    assert res_t.backend == "torch" and res_m.backend == "mlx"
    assert len(loss_t) == len(loss_m) == 20
    rel = np.abs(np.array(loss_t) - np.array(loss_m)) / np.array(loss_t)
    assert rel.max() < 1e-3, rel
    assert loss_t[-1] < loss_t[0] - 0.05  # it trained: the comparison is not between two flat lines
    assert res_t.info["trainable_params"] == res_m.info["trainable_params"]


@pytest.mark.parametrize("kind", METHODS)
def test_adapter_trained_on_mlx_gives_same_logits_on_torch_and_peft(trained, tiny_model_dir, kind):
    adapter = trained[kind, "mlx"][0].adapter
    on_mlx = logits_on("mlx", tiny_model_dir, adapter)
    on_torch = logits_on("torch", tiny_model_dir, adapter)
    on_peft = peft_logits(tiny_model_dir, adapter)
    base = logits_on("torch", tiny_model_dir, None)
    assert np.abs(on_mlx - base).max() > 1e-2  # the adapter changes the output, so agreement means something
    assert np.abs(on_mlx - on_torch).max() <= 1e-4
    assert np.abs(on_mlx - on_peft).max() <= 1e-4


@pytest.mark.parametrize("kind", METHODS)
def test_adapter_trained_on_torch_gives_same_logits_on_mlx(trained, tiny_model_dir, kind):
    adapter = trained[kind, "torch"][0].adapter
    assert np.abs(logits_on("torch", tiny_model_dir, adapter) - logits_on("mlx", tiny_model_dir, adapter)).max() <= 1e-4


def test_the_two_adapter_folders_hold_the_same_tensors(trained):
    for kind in METHODS:
        a = read_safetensors(trained[kind, "torch"][0].adapter / "adapter_model.safetensors")
        b = read_safetensors(trained[kind, "mlx"][0].adapter / "adapter_model.safetensors")
        assert sorted(a) == sorted(b)
        assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-3, kind
        cfg_t = json.loads((trained[kind, "torch"][0].adapter / "adapter_config.json").read_text())
        cfg_m = json.loads((trained[kind, "mlx"][0].adapter / "adapter_config.json").read_text())
        for key in ("peft_type", "r", "lora_alpha", "use_dora", "num_virtual_tokens", "layers_to_transform"):
            assert cfg_t.get(key) == cfg_m.get(key), (kind, key)
        assert sorted(cfg_t.get("target_modules") or []) == sorted(cfg_m.get("target_modules") or [])


@pytest.mark.parametrize("kind", METHODS)
def test_eval_of_one_adapter_agrees_to_4_significant_digits(trained, kind):
    res, _, recipe_path = trained[kind, "mlx"]
    (recipe,) = load_recipes([recipe_path])
    on_torch = evaluate_recipe(recipe, "torch", res.adapter, compare=False)["loss"]
    on_mlx = evaluate_recipe(recipe, "mlx", res.adapter, compare=False)["loss"]
    assert f"{on_torch:.4g}" == f"{on_mlx:.4g}", (on_torch, on_mlx)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_models_from_either_backend_are_the_same(trained, tmp_path, kind):
    adapter = trained[kind, "mlx"][0].adapter
    fuse(adapter, tmp_path / "t", model=None, backend_name="torch", dequantize=False, force=False)
    fuse(adapter, tmp_path / "m", model=None, backend_name="mlx", dequantize=False, force=False)
    a, b = read_safetensors(tmp_path / "t" / "model.safetensors"), read_safetensors(tmp_path / "m" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-5
    # a fused folder is a plain model: transformers loads it and it matches the adapter's output
    from transformers import AutoModelForCausalLM

    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        out = fused(input_ids=torch.tensor([token_ids(tmp_path / "m")])).logits[0].numpy()
    base = Path(json.loads((adapter / "ftkit.json").read_text())["base_model"]["path"])
    assert np.abs(out - logits_on("mlx", base, adapter)).max() <= 1e-4


def test_soft_prompt_cannot_be_fused(trained, tmp_path):
    from ftkit.common.errors import FtkitError

    with pytest.raises(FtkitError, match="soft prompt cannot be merged"):
        fuse(trained["prompt", "mlx"][0].adapter, tmp_path / "f", model=None, backend_name="mlx", dequantize=False, force=False)


def test_generation_is_the_same_on_both_backends(trained, tiny_model_dir):
    from ftkit.evaluate.generate import Sampling, generate

    tok = load_tokenizer(tiny_model_dir)
    recipe = build_recipe({"model": {"path": str(tiny_model_dir)}, "data": {"path": "-"}}, "t", check_paths=False)
    for kind in ("lora", "prompt"):
        adapter = trained[kind, "mlx"][0].adapter
        outs = []
        for name in ("torch", "mlx"):
            be = load_for_inference(recipe, name, adapter, tiny_model_dir, tok)
            outs.append(list(generate(be, token_ids(tiny_model_dir), 12, Sampling(temperature=0.8, seed=3), set())))
        assert outs[0] == outs[1], kind


# ---------------------------------------------------------------- adapters from other tools

@pytest.fixture(scope="module")
def mlx_lm_adapter(tmp_path_factory, tiny_model_dir, wikisql_dir) -> Path:
    """An adapter written by the real `mlx_lm lora` command, offline, on the tiny model."""
    tmp = tmp_path_factory.mktemp("mlx_lm")
    data = tmp / "data"
    data.mkdir()
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("\n".join((wikisql_dir / f"{split}.jsonl").read_text().splitlines()[:16]) + "\n")
    out = tmp / "adapter"
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(tiny_model_dir), "--train", "--data", str(data),
           "--iters", "4", "--batch-size", "2", "--num-layers", "1", "--adapter-path", str(out), "--val-batches", "1",
           "--steps-per-eval", "100", "--learning-rate", "3e-2", "--seed", "0"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out


def test_mlx_lm_adapter_loads_into_both_backends(mlx_lm_adapter, tiny_model_dir):
    from mlx_lm.utils import load_adapters, load_model

    model, _ = load_model(tiny_model_dir)
    load_adapters(model, str(mlx_lm_adapter))
    model.eval()
    reference = np.array(model(mx.array([token_ids(tiny_model_dir)]))[0])  # mlx-lm's own reading of its adapter
    assert np.abs(logits_on("torch", tiny_model_dir, mlx_lm_adapter) - reference).max() <= 1e-4
    assert np.abs(logits_on("mlx", tiny_model_dir, mlx_lm_adapter) - reference).max() <= 1e-4


def test_training_continues_from_an_mlx_lm_adapter(mlx_lm_adapter, tmp_path, tiny_model_dir, small_data):
    p = recipe_file(tmp_path, tiny_model_dir, small_data, name="cont", method={"rank": 8, "alpha": 160, "layers": 1, "resume_from": str(mlx_lm_adapter)},
                    train={"iters": 2, "save_every": 2, "val_batches": 4})  # all 16 valid examples
    (recipe,) = load_recipes([p])
    for backend in ("torch", "mlx"):
        recipe.output.dir = str(tmp_path / f"cont-{backend}")
        res = Trainer(prepare(recipe), backend, quiet=True).run()
        # step 0 validates the imported adapter as it was: the run starts from it, not from a fresh one
        assert res.first_valid_loss == pytest.approx(evaluate_recipe(recipe, "mlx", mlx_lm_adapter, "valid", compare=False)["loss"], rel=1e-5)
        assert res.first_valid_loss != pytest.approx(evaluate_recipe(recipe, "mlx", None, "valid", compare=False)["loss"], rel=1e-3)
        cfg = json.loads((res.adapter / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], cfg["layers_to_transform"]) == (8, 160, [1])
        assert len(read_safetensors(res.adapter / "adapter_model.safetensors")) == 2 * 7  # one block, 7 linears, A and B


def test_peft_adapter_from_another_tool_loads_into_mlx(tmp_path, tiny_model_dir):
    """A PEFT adapter made with PEFT's own init (non-zero B), target names as other tools write them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "peft")
    assert np.abs(logits_on("mlx", tiny_model_dir, tmp_path / "peft") - peft_logits(tiny_model_dir, tmp_path / "peft")).max() <= 1e-4


# ---------------------------------------------------------------- mismatches

def test_adapter_on_a_different_base_is_refused_naming_it(trained, tmp_path):
    from builders import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", seed=1, hidden=96)
    adapter = trained["lora", "mlx"][0].adapter
    for backend in ("torch", "mlx"):
        with pytest.raises(AdapterMismatchError, match="fingerprint"):
            logits_on(backend, other, adapter)
    # without ftkit.json (a bare PEFT folder), the shapes still name the mismatch
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((adapter / name).read_bytes())
    for backend in ("torch", "mlx"):
        with pytest.raises(AdapterMismatchError, match=r"maps \d+ -> 96: it was trained on a different base model"):
            logits_on(backend, other, bare)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_resume_from_with_another_rank_or_target_set_is_refused(trained, tmp_path, tiny_model_dir, small_data, backend):
    adapter = trained["lora", "torch"][0].adapter
    p = recipe_file(tmp_path, tiny_model_dir, small_data, name="r8", method={"rank": 8, "resume_from": str(adapter)})
    (recipe,) = load_recipes([p])
    with pytest.raises(AdapterMismatchError, match="rank 4, but the recipe's method.rank is 8"):
        Trainer(prepare(recipe), backend, quiet=True).run()
    p = recipe_file(tmp_path, tiny_model_dir, small_data, name="qv", method={"targets": ["q_proj", "v_proj"], "resume_from": str(adapter)})
    (recipe,) = load_recipes([p])
    with pytest.raises(AdapterMismatchError, match="target set differs.*adapter holds 10 module"):
        Trainer(prepare(recipe), backend, quiet=True).run()


def test_both_backends_are_really_used(trained):
    import ftkit_mlx.backend
    import ftkit_torch.backend

    assert type(get_backend("mlx")) is ftkit_mlx.backend.MlxBackend
    assert type(get_backend("torch")) is ftkit_torch.backend.TorchBackend
    for kind in METHODS:
        for backend in ("torch", "mlx"):
            meta = json.loads((trained[kind, backend][0].adapter / "ftkit.json").read_text())
            assert meta["backend"] == backend
            assert trained[kind, backend][0].info["device"].startswith("mlx" if backend == "mlx" else "cpu")
