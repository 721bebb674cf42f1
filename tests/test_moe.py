"""Mixture-of-experts families on both backends: one module selection, LoRA on the routed experts with
the same numbers on MLX, torch and plain PEFT, and fused folders that transformers reads back whole.

Tiny config-built models of each family in tests/families.py (2 blocks, 4 experts, top-2), fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytest.importorskip("peft")

import builders
from builders import recipe_file, wikisql_slice
from families import MOE_FAMILIES, build_family

from ftkit.adapters import layout as adapter_layout
from ftkit.adapters import targets
from ftkit.common.errors import FtkitError
from ftkit.common.tensors import read_safetensors
from ftkit.models.tokenizer import load_tokenizer
from ftkit.ops.fuse import check_model_folder, fuse
from ftkit.recipe.load import load_recipes
from ftkit.recipe.schema import MethodSection
from ftkit.train.loop import Trainer
from ftkit.train.prepare import prepare

PROMPT = "table: 1-10015132-11\ncolumns: Player, No., Nationality\nQ: Which player wore number 4?\nA: SELECT"
EXPERTS_TOO = ["all-linear", "experts"]
STEPS = 4


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer_dir):
    """family -> its tiny model folder, built once per module and only for the families asked for."""
    root, built = tmp_path_factory.mktemp("moe"), {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family(family, root / family, tokenizer_dir)
        return built[family]

    return get


def mlx_model(path: Path):
    from ftkit_mlx import model_io

    try:
        return model_io.load_base(path)[0]
    except FtkitError as e:
        if "qwen3_moe" in path.name:  # transformers 5's qwen3_moe config is not yet translated for mlx-lm
            pytest.skip(f"MLX cannot load qwen3_moe yet: {e}")
        raise


def torch_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def token_ids(model_dir: Path) -> list[int]:
    return load_tokenizer(model_dir)(PROMPT).input_ids


def logits_on(backend_name: str, model_dir: Path, adapter: Path | None) -> np.ndarray:
    return builders.logits_on(backend_name, model_dir, adapter, PROMPT)


def plain_logits(model) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids(Path(model.config._name_or_path))])).logits[0].float().numpy()


def unordered(value):
    """PEFT writes target_modules and target_parameters from sets: their order means nothing."""
    return sorted(value) if isinstance(value, list) else value


# ---------------------------------------------------------------- selection (no training)

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_both_backends_select_the_same_modules(family_dirs, family):
    from ftkit_mlx.methods import linear_shapes as mlx_shapes
    from ftkit_torch.methods import linear_shapes as torch_shapes

    path = family_dirs(family)
    on_mlx, on_torch = mlx_shapes(mlx_model(path)), torch_shapes(torch_model(path))
    for wanted in ("all-linear", EXPERTS_TOO, ["experts.down_proj", "q_proj"]):
        method = MethodSection(targets=wanted)
        chosen = targets.select(list(on_torch), method, 2)
        assert chosen == targets.select(list(on_mlx), method, 2), wanted
        assert all(on_torch[p] == on_mlx[p] for p in chosen)  # and the same shapes: (out, in) or (experts, out, in)
        assert not any(targets.is_router(p) for p in chosen)
    plain = targets.select(list(on_torch), MethodSection(), 2)
    assert {targets.leaf(p) for p in plain if "self_attn" in p} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any(targets.is_expert(p) for p in plain)  # all-linear = PEFT's: the experts are not nn.Linear
    with_experts = targets.select(list(on_torch), MethodSection(targets=EXPERTS_TOO), 2)
    assert {p for p in with_experts if targets.is_expert(p)} == {
        f"model.layers.{i}.mlp.experts.{n}" for i in range(2) for n in ("gate_up_proj", "down_proj")}
    if family == "qwen2_moe":  # the shared expert is a plain MLP of nn.Linears on both backends
        assert {targets.leaf(p) for p in plain if "shared_expert" in p} == {"gate_proj", "up_proj", "down_proj", "shared_expert_gate"}


def test_all_linear_on_a_moe_model_says_what_it_adapts(capsys):
    paths = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "mlp.gate", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")]
    assert targets.select(paths, MethodSection(), 1) == ["model.layers.0.self_attn.q_proj"]
    err = capsys.readouterr().err
    assert "attention (q_proj)" in err and "not the routers, nor the routed experts" in err and '["all-linear", "experts"]' in err
    targets.select(paths, MethodSection(targets=EXPERTS_TOO), 1)
    assert "experts (down_proj, gate_up_proj)" in capsys.readouterr().err
    targets.select(["model.layers.0.self_attn.q_proj"], MethodSection(), 1)  # a dense model: nothing to say
    assert capsys.readouterr().err == ""


def test_expert_lora_without_a_peft_equivalent_is_refused():
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts.down_proj"]
    with pytest.raises(FtkitError, match="method.dropout = 0.1 with MoE experts.*set method.dropout = 0"):
        targets.select(paths, MethodSection(targets=["experts"], dropout=0.1), 1)
    with pytest.raises(FtkitError, match="method.kind = 'dora' with MoE experts"):
        targets.select(paths, MethodSection(kind="dora", targets=EXPERTS_TOO), 1)
    with pytest.raises(FtkitError, match=r"\['gate'\] match no linear layer.*'experts'.*routers are never adapted"):
        targets.select(paths + ["model.layers.0.mlp.gate"], MethodSection(targets=["gate"]), 1)
    assert targets.select(paths, MethodSection(targets=["all-linear"], dropout=0.1), 1) == paths[:1]  # no experts: fine


@pytest.mark.parametrize("both", [True, False])
def test_expert_tensors_take_peft_names_and_layout(tmp_path, both):
    """PEFT nests one wrapper per expert parameter (gate_up_proj innermost), and holds each expert's
    factors in one matrix; ftkit writes exactly that and reads it back."""
    rng = np.random.default_rng(0)
    params = ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"][0 if both else 1:]
    lora = adapter_layout.LoraAdapter(kind="lora", scale=2.0, dropout=0.0)
    for p in params:
        lora.a[p], lora.b[p] = rng.normal(size=(4, 2, 6)).astype(np.float32), rng.normal(size=(4, 5, 2)).astype(np.float32)
    cfg = adapter_layout.lora_config("lora", 2, 4.0, 0.0, params, "base", all_layers=2)
    assert (cfg["target_modules"], cfg["target_parameters"]) == ([], sorted(params))  # block 1 only: full paths
    adapter_layout.write_adapter(tmp_path, cfg, lora)
    keys = sorted(read_safetensors(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.mlp.experts."
    want = [prefix + "base_layer.lora_A.weight", prefix + "base_layer.lora_B.weight"] if both else []
    assert keys == want + [prefix + "lora_A.weight", prefix + "lora_B.weight"]
    tensors = read_safetensors(tmp_path / "adapter_model.safetensors")
    a, b = tensors[prefix + "lora_A.weight"], tensors[prefix + "lora_B.weight"]
    down = lora.a["model.layers.1.mlp.experts.down_proj"], lora.b["model.layers.1.mlp.experts.down_proj"]
    np.testing.assert_array_equal(a[2:4], down[0][1])  # expert 1's A: rows r*1 .. r*2
    np.testing.assert_array_equal(b[:, 1::4], down[1][1])  # expert 1's B: every 4th column from 1
    _, back = adapter_layout.read_adapter(tmp_path)
    assert back.modules == sorted(params) and back.rank(params[0]) == 2
    for p in params:
        np.testing.assert_array_equal(back.a[p], lora.a[p])
        np.testing.assert_array_equal(back.b[p], lora.b[p])


def test_a_folder_with_stacked_or_missing_experts_is_refused(tmp_path):
    from safetensors.numpy import save_file

    from ftkit.ops import fuse as fuse_module

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 1, "tie_word_embeddings": False}))
    tensors = {n: np.zeros(2, np.float32) for n in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.switch_mlp.up_proj.weight")}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(FtkitError, match=r"1 unexpected keys \(e.g. model.layers.0.mlp.switch_mlp.up_proj.weight\)"):
        fuse_module._check_names(tmp_path, json.loads((tmp_path / "config.json").read_text()), mlx_layout=False)
    fuse_module._check_names(tmp_path, {"num_hidden_layers": 1}, mlx_layout=True)  # MLX's own quantized folders keep them


# ---------------------------------------------------------------- training on both backends

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, wikisql_dir) -> Path:
    d = tmp_path_factory.mktemp("moe-data")
    wikisql_slice(d, train=32, valid=8, test=8)
    return d


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def trained(request, tmp_path_factory, family_dirs, data_dir):
    """LoRA on attention (+ shared experts) + the routed experts, STEPS steps on each backend, same recipe and seed."""
    family = request.param
    model = family_dirs(family)
    mlx_model(model)  # skips qwen3_moe while MLX cannot load it
    tmp = tmp_path_factory.mktemp(f"train-{family}")
    out = {"family": family, "model": model}
    for backend in ("torch", "mlx"):
        p = recipe_file(tmp, model, data_dir, name=f"{family}-{backend}", method={"targets": EXPERTS_TOO},
                        train={"iters": STEPS, "save_every": STEPS, "lr": 1e-2, "steps_per_eval": STEPS, "val_batches": 1})
        (recipe,) = load_recipes([p])
        result = Trainer(prepare(recipe), backend, quiet=True).run()
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        out[backend] = result, [r["loss"] for r in rows if r["kind"] == "train"]
    return out


@pytest.mark.slow
def test_same_losses_and_adapter_on_both_backends(trained):
    (res_t, loss_t), (res_m, loss_m) = trained["torch"], trained["mlx"]
    assert len(loss_t) == len(loss_m) == STEPS
    rel = np.abs(np.array(loss_t) - np.array(loss_m)) / np.array(loss_t)
    assert rel.max() < 1e-5, rel
    assert loss_t[-1] < loss_t[0]
    assert res_t.info["trainable_params"] == res_m.info["trainable_params"]
    a = read_safetensors(res_t.adapter / "adapter_model.safetensors")
    b = read_safetensors(res_m.adapter / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert any(".experts.base_layer.lora_B" in k for k in a) and any(".experts.lora_B" in k for k in a)
    assert all(np.abs(a[k]).max() > 0 for k in a if ".experts." in k)  # the experts trained, not only attention
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-4
    cfg_t, cfg_m = (json.loads((r.adapter / "adapter_config.json").read_text()) for r in (res_t, res_m))
    for key in ("target_modules", "target_parameters", "layers_to_transform", "r", "lora_alpha", "lora_dropout"):
        assert unordered(cfg_t[key]) == unordered(cfg_m[key]), key
    assert cfg_m["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


@pytest.mark.slow
def test_adapters_give_the_same_logits_on_mlx_torch_and_plain_peft(trained):
    from peft import PeftModel

    model = trained["model"]
    base = logits_on("torch", model, None)
    for backend in ("mlx", "torch"):
        adapter = trained[backend][0].adapter
        on_mlx, on_torch = logits_on("mlx", model, adapter), logits_on("torch", model, adapter)
        on_peft = plain_logits(PeftModel.from_pretrained(torch_model(model), str(adapter)))
        assert np.abs(on_mlx - base).max() > 1e-2, backend  # the adapter changes the output
        assert np.abs(on_mlx - on_torch).max() <= 1e-4, backend
        assert np.abs(on_mlx - on_peft).max() <= 1e-4, backend


@pytest.mark.slow
def test_plain_peft_loads_every_adapter_tensor(trained):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    adapter = trained["mlx"][0].adapter
    peft_model = get_peft_model(torch_model(trained["model"]), LoraConfig.from_pretrained(str(adapter)))
    tensors = {k: torch.from_numpy(v) for k, v in read_safetensors(adapter / "adapter_model.safetensors").items()}
    result = set_peft_model_state_dict(peft_model, tensors)
    assert [k for k in result.missing_keys if "lora_" in k] == []
    assert list(result.unexpected_keys) == []


@pytest.mark.slow
def test_fused_folders_from_both_backends_load_whole_and_match_the_adapter(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, model = trained["mlx"][0].adapter, trained["model"]
    want = logits_on("mlx", model, adapter)
    folders = {}
    for backend in ("torch", "mlx"):
        folders[backend] = out = tmp_path / backend
        fuse(adapter, out, model=None, backend_name=backend, dequantize=False, force=False)
        fused, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), backend
        assert np.abs(plain_logits(fused) - want).max() <= 1e-4, backend
    a, b = (read_safetensors(folders[k] / "model.safetensors") for k in ("torch", "mlx"))
    assert sorted(a) == sorted(b)  # the per-expert layout save_pretrained writes
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-5


# ---------------------------------------------------------------- adapters from PEFT itself; fuse refusals

@pytest.fixture(scope="module")
def peft_expert_adapter(tmp_path_factory, family_dirs) -> tuple[Path, Path]:
    """An OLMoE adapter written by PEFT itself (random B: PEFT's own values), on one expert parameter
    of one block and on q_proj: the single-parameter tensor names and full-path target_parameters."""
    from peft import LoraConfig, get_peft_model

    model = family_dirs("olmoe")
    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["model.layers.1.mlp.experts.down_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    out = tmp_path_factory.mktemp("peft-olmoe") / "adapter"
    get_peft_model(torch_model(model), cfg).save_pretrained(out)
    return model, out


def test_a_peft_expert_adapter_gives_the_same_logits_on_mlx(peft_expert_adapter):
    from peft import PeftModel

    model, adapter = peft_expert_adapter
    want = plain_logits(PeftModel.from_pretrained(torch_model(model), str(adapter)))
    assert np.abs(logits_on("mlx", model, adapter) - want).max() <= 1e-4
    assert np.abs(logits_on("torch", model, adapter) - want).max() <= 1e-4


def test_mlx_fuse_that_would_write_stacked_experts_fails_and_leaves_nothing(peft_expert_adapter, tmp_path, monkeypatch):
    import ftkit_mlx.experts

    model, adapter = peft_expert_adapter
    monkeypatch.setattr(ftkit_mlx.experts, "hf_expert_weights", lambda weights, model_type: weights)  # the old writer
    out = tmp_path / "fused"
    with pytest.raises(FtkitError, match="would not load whole in transformers.*missing keys.*unexpected keys.*switch_mlp"):
        fuse(adapter, out, model=str(model), backend_name="mlx", dequantize=False, force=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    fuse(adapter, out, model=str(model), backend_name="mlx", dequantize=False, force=False)
    check_model_folder(out)
