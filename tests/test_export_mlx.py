"""ftkit export --format mlx: an adapter as mlx-lm's own adapter folder, loaded by mlx-lm's own loader.

Adapters trained a few steps on the tiny Llama (LoRA and DoRA on torch, LoRA on MLX), PEFT adapters
with other module sets, and a PEFT expert LoRA on tiny MoE models are exported, loaded with
`mlx_lm.utils.load(model, adapter_path=...)` (no ftkit code on that side) and compared with PEFT's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
peft = pytest.importorskip("peft")

from builders import recipe_file, wikisql_slice
from typer.testing import CliRunner

from ftkit.adapters.layout import (
    LoraAdapter,
    PromptAdapter,
    lora_config,
    prompt_config,
    write_adapter,
)
from ftkit.cli import app
from ftkit.common.errors import FtkitError
from ftkit.models.tokenizer import load_tokenizer
from ftkit.ops.export_mlx import export_mlx
from ftkit.recipe.load import load_recipes
from ftkit.train.loop import Trainer
from ftkit.train.prepare import prepare

PROMPTS = [
    "table: 1-10015132-11\ncolumns: Player, No., Nationality\nQ: Which player wore number 4?\nA: SELECT",
    "Q: How many schools?\nA:",
    "columns: Year, Team, Wins",
]
LINEAR = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, wikisql_dir):
    """(kind, backend) -> the adapter folder of a 3-step run."""
    tmp = tmp_path_factory.mktemp("export-mlx")
    data = wikisql_slice(tmp / "data", train=24, valid=8, test=8)
    out = {}
    for kind, backend in (("lora", "torch"), ("dora", "torch"), ("lora", "mlx")):
        p = recipe_file(tmp, tiny_model_dir, data, name=f"{kind}-{backend}", method={"kind": kind},
                        train={"iters": 3, "save_every": 3, "steps_per_eval": 100, "lr": 1e-2})
        (recipe,) = load_recipes([p])
        out[kind, backend] = Trainer(prepare(recipe), backend, quiet=True).run().adapter
    return out


def token_ids(model_dir: Path) -> list[list[int]]:
    tok = load_tokenizer(model_dir)
    return [tok(p).input_ids for p in PROMPTS]


def peft_logits(model_dir: Path, adapter: Path | None) -> list[np.ndarray]:
    """Plain transformers + PEFT."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in token_ids(model_dir)]


def mlx_lm_logits(model_dir: Path, adapter: Path) -> list[np.ndarray]:
    """mlx-lm's own loader, as mlx_lm.generate --adapter-path and mlx_lm.server call it."""
    from mlx_lm.utils import load

    model, _ = load(str(model_dir), adapter_path=str(adapter))
    return [np.array(model(mx.array([ids]))[0].astype(mx.float32)) for ids in token_ids(model_dir)]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def mlx_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize("kind,backend", [("lora", "torch"), ("dora", "torch"), ("lora", "mlx")])
def test_a_trained_adapter_loads_in_mlx_lm_with_peft_logits(trained, tiny_model_dir, tmp_path, kind, backend):
    adapter = trained[kind, backend]
    out = tmp_path / "mlx"
    result = runner.invoke(app, ["export", str(adapter), "--format", "mlx", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["mlx"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert mlx_config(out) == {
        "fine_tune_type": kind, "num_layers": 2, "model": str(tiny_model_dir),
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": LINEAR},
    }
    want, got = peft_logits(tiny_model_dir, adapter), mlx_lm_logits(tiny_model_dir, out)
    assert max_diff(want, peft_logits(tiny_model_dir, None)) > 1e-2  # the adapter changes the output
    assert max_diff(got, want) <= 1e-4


def custom_adapter(model_dir: Path, dest: Path, modules: list[str], kind: str = "lora", ranks: dict | None = None) -> Path:
    """A LoRA/DoRA adapter on exactly `modules` (full paths), B drawn nonzero so that it matters."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])
    dims = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    rng = np.random.default_rng(0)
    lora = LoraAdapter(kind=kind, scale=2.0, dropout=0.0)
    for m in modules:
        out_dim, in_dim = dims[m.rsplit(".", 1)[1]]
        r = (ranks or {}).get(m, 4)
        lora.a[m] = rng.normal(0, 0.3, (r, in_dim)).astype(np.float32)
        lora.b[m] = rng.normal(0, 0.3, (out_dim, r)).astype(np.float32)
        if kind == "dora":
            lora.m[m] = rng.uniform(0.5, 1.5, out_dim).astype(np.float32)
    write_adapter(dest, lora_config(kind, 4, 8, 0.0, modules, str(model_dir), all_layers=cfg["num_hidden_layers"]), lora)
    return dest


SETS = {
    # the last block only: mlx-lm's own form, num_layers 1
    "last-block": (["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"], 1, ["self_attn.q_proj", "self_attn.v_proj"]),
    # the first block only (not the last N), and other modules per block: by full module path
    "first-block": (["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"], 2, None),
    "per-layer": (["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"], 2, None),
}


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_any_module_set_loads_in_mlx_lm_exactly(tiny_model_dir, tmp_path, name, kind):
    modules, num_layers, keys = SETS[name]
    adapter = custom_adapter(tiny_model_dir, tmp_path / "adapter", modules, kind)
    info = export_mlx(adapter, tmp_path / "mlx")
    cfg = mlx_config(tmp_path / "mlx")
    assert cfg["num_layers"] == num_layers and cfg["fine_tune_type"] == kind
    assert cfg["lora_parameters"]["keys"] == (keys or sorted(modules)) and info["full_paths"] == (keys is None)
    assert max_diff(mlx_lm_logits(tiny_model_dir, tmp_path / "mlx"), peft_logits(tiny_model_dir, adapter)) <= 1e-4


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_an_expert_lora_becomes_mlx_lm_switch_linear_loras(tmp_path, tokenizer_dir, family):
    """PEFT's one LoRA on gate_up_proj -> mlx-lm's LoRAs on gate_proj and up_proj (same A, B's halves);
    Mixtral's block is `block_sparse_moe` in mlx-lm."""
    from families import build_family
    from transformers import AutoModelForCausalLM

    model = build_family(family, tmp_path / family, tokenizer_dir)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM",
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), cfg).save_pretrained(tmp_path / "adapter")
    export_mlx(tmp_path / "adapter", tmp_path / "mlx")
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    assert mlx_config(tmp_path / "mlx")["lora_parameters"]["keys"] == [
        f"{block}.switch_mlp.down_proj", f"{block}.switch_mlp.gate_proj", f"{block}.switch_mlp.up_proj", "self_attn.q_proj"]
    assert max_diff(mlx_lm_logits(model, tmp_path / "mlx"), peft_logits(model, tmp_path / "adapter")) <= 1e-4


def test_what_mlx_lm_cannot_load_is_refused_naming_why(tiny_model_dir, tmp_path):
    prompt = tmp_path / "prompt"
    write_adapter(prompt, prompt_config(4, 64, 2, 4, str(tiny_model_dir)), PromptAdapter(np.zeros((4, 64), np.float32)))
    with pytest.raises(FtkitError, match="prompt-tuning.*no soft prompts"):
        export_mlx(prompt, tmp_path / "a")
    with pytest.raises(FtkitError, match="a model folder.*mlx_lm.generate --model"):
        export_mlx(tiny_model_dir, tmp_path / "b")
    mixed = custom_adapter(tiny_model_dir, tmp_path / "mixed", ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"],
                           ranks={"model.layers.1.self_attn.v_proj": 2})
    with pytest.raises(FtkitError, match=r"rank 2 and 4|different ranks \[2, 4\]"):  # mlx-lm holds one rank for every module
        export_mlx(mixed, tmp_path / "c")
    rng = np.random.default_rng(0)
    experts = LoraAdapter(kind="dora", scale=2.0, dropout=0.0, a={"model.layers.0.mlp.experts.down_proj": rng.normal(size=(4, 2, 32)).astype(np.float32)},
                          b={"model.layers.0.mlp.experts.down_proj": rng.normal(size=(4, 64, 2)).astype(np.float32)},
                          m={"model.layers.0.mlp.experts.down_proj": np.ones(64, np.float32)})
    write_adapter(tmp_path / "dora-experts", lora_config("dora", 2, 4, 0.0, experts.modules, None), experts)
    with pytest.raises(FtkitError, match="DoRA adapter on MoE experts.*mlx-lm has no DoRA on experts"):
        export_mlx(tmp_path / "dora-experts", tmp_path / "d")
    assert not any((tmp_path / x).exists() for x in "abcd")

    adapter = custom_adapter(tiny_model_dir, tmp_path / "adapter", ["model.layers.1.self_attn.q_proj"])
    with pytest.raises(FtkitError, match="replace the adapter being exported"):
        export_mlx(adapter, adapter)
    export_mlx(adapter, tmp_path / "out")
    with pytest.raises(FtkitError, match="already exists; pass --force"):
        export_mlx(adapter, tmp_path / "out")
    export_mlx(adapter, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "adapters.safetensors").exists() and not list(tmp_path.glob(".out.*"))

    for args, message in ((["--merged"], "--merged is for --format gguf"), (["--outtype", "q8_0"], "--outtype q8_0 is for --format gguf"),
                          ([], "already exists")):
        result = runner.invoke(app, ["export", str(adapter), "--format", "mlx", "--out", str(tmp_path / "out"), *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_default_out_sits_beside_the_run(tiny_model_dir, tmp_path):
    adapter = custom_adapter(tiny_model_dir, tmp_path / "run-x" / "adapter", ["model.layers.1.self_attn.q_proj"])
    result = runner.invoke(app, ["export", str(adapter), "--format", "mlx"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run-x" / "run-x-mlx" / "adapters.safetensors").exists()
    assert "mlx_lm.generate --model" in result.output and "--adapter-path" in result.output


def test_without_its_base_model_the_adapter_is_written_by_full_module_path(tiny_model_dir, tmp_path):
    """How many blocks the model has decides num_layers; with the base nowhere (nor --model), full
    paths still wrap exactly the adapter's modules."""
    modules = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    adapter = custom_adapter(tiny_model_dir, tmp_path / "adapter", modules)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "nobody/no-such-model"}))
    info = export_mlx(adapter, tmp_path / "mlx")
    assert info["full_paths"] and mlx_config(tmp_path / "mlx")["lora_parameters"]["keys"] == modules
    assert max_diff(mlx_lm_logits(tiny_model_dir, tmp_path / "mlx"), peft_logits(tiny_model_dir, adapter)) <= 1e-4
    export_mlx(adapter, tmp_path / "mlx", model=str(tiny_model_dir), force=True)  # --model: mlx-lm's own form
    assert mlx_config(tmp_path / "mlx")["num_layers"] == 1
    assert mlx_config(tmp_path / "mlx")["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
