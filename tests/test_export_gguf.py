"""ftkit export: a LoRA adapter as a llama.cpp GGUF adapter, and a fused model as GGUF (f32/f16/q8_0).

No llama.cpp here, so its side is done by hand, as llama.cpp does it: a GGUF LoRA applied to the base
model's GGUF (W + alpha / r * B @ A on the stored tensors) must give the fused model's GGUF; and the
fused GGUF, read back through `ftkit convert` (transformers' GGUF reader), must give PEFT's logits."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from builders import PYTHONPATH
from families import FAMILIES as TINY_FAMILIES
from families import MOE_FAMILIES, build_family, sharpen

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
peft = pytest.importorskip("peft")

from safetensors.numpy import save_file

from ftkit.adapters.layout import LoraAdapter, lora_config, write_adapter
from ftkit.common.errors import FtkitError
from ftkit.common.tensors import read_safetensors
from ftkit.models.convert import convert
from ftkit.ops import gguf_arch
from ftkit.ops.export_gguf import (
    export_lora,
    export_merged,
    read_gguf,
    to_gguf_rope_order,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(model_dir, dest, use_dora=False, seed=0):
    """A PEFT adapter from outside ftkit, with B drawn nonzero so that it changes the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_dora=use_dora)
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(dest)
    return dest, model.eval()


def test_lora_gguf_holds_the_adapter_in_llama_cpp_layout(tmp_path, tiny_model_dir):
    adapter, _ = peft_adapter(tiny_model_dir, tmp_path / "adapter")
    out = export_lora(adapter, tmp_path / "a.gguf")
    assert out["tensors"] == 2 * 2 * len(TARGETS) and out["alpha"] == 8.0 and out["rank"] == 4
    got = read_gguf(tmp_path / "a.gguf")
    f = got["fields"]
    assert f["general.type"] == "adapter" and f["adapter.type"] == "lora" and f["adapter.lora.alpha"] == 8.0
    assert f["general.architecture"] == "llama"
    src = read_safetensors(adapter / "adapter_model.safetensors")
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    for i in range(2):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")):
            a = src[f"base_model.model.model.layers.{i}.{hf}.lora_A.weight"]
            b = src[f"base_model.model.model.layers.{i}.{hf}.lora_B.weight"]
            if gg in ("attn_q", "attn_k"):
                b = to_gguf_rope_order(b, cfg["num_attention_heads"] if gg == "attn_q" else cfg["num_key_value_heads"])
            ga, ta = got["tensors"][f"blk.{i}.{gg}.weight.lora_a"]
            gb, tb = got["tensors"][f"blk.{i}.{gg}.weight.lora_b"]
            assert ta == tb == "F32"
            np.testing.assert_array_equal(ga, a)  # (r, in): ggml ne = [in, r], as llama.cpp checks
            np.testing.assert_array_equal(gb, b)  # (out, r)
    assert not (tmp_path / ".a.gguf.tmp").exists()


def test_lora_gguf_applied_to_the_base_gguf_is_the_fused_model(tmp_path, tiny_model_dir):
    adapter, model = peft_adapter(tiny_model_dir, tmp_path / "adapter")
    export_lora(adapter, tmp_path / "lora.gguf")
    export_merged(tiny_model_dir, tmp_path / "base.gguf", outtype="f32")
    fused = export_merged(adapter, tmp_path / "fused.gguf", outtype="f32", backend="torch")
    assert fused["tensors"] == 21
    base, lora = read_gguf(tmp_path / "base.gguf"), read_gguf(tmp_path / "lora.gguf")
    want = read_gguf(tmp_path / "fused.gguf")["tensors"]
    scale = lora["fields"]["adapter.lora.alpha"] / 4
    applied = 0
    for name, (w, _) in base["tensors"].items():  # what llama.cpp computes with --lora
        w = w.astype(np.float64)
        if f"{name}.lora_a" in lora["tensors"]:
            a, b = lora["tensors"][f"{name}.lora_a"][0], lora["tensors"][f"{name}.lora_b"][0]
            w = w + scale * (b.astype(np.float64) @ a.astype(np.float64))
            applied += 1
        np.testing.assert_allclose(w, want[name][0], atol=2e-6, err_msg=name)
    assert applied == 2 * len(TARGETS)

    # The fused GGUF read back by ftkit convert gives PEFT's logits.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = convert(tmp_path / "fused.gguf", tmp_path / "back", dtype="float32")
    tok = AutoTokenizer.from_pretrained(back)
    text = "SELECT name FROM table WHERE id = 3"
    assert tok(text).input_ids == AutoTokenizer.from_pretrained(tiny_model_dir)(text).input_ids
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        ref = model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(ids).logits
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("outtype, tol", [("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 6e-2)])
def test_fused_gguf_quantized_reads_back_close(tmp_path, tiny_model_dir, outtype, tol):
    from transformers import AutoModelForCausalLM

    out = export_merged(tiny_model_dir, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    types = {t for _, t in read_gguf(out["gguf"])["tensors"].values()}
    assert types == {"F32", outtype.upper()}  # norms stay f32
    back = convert(tmp_path / f"m-{outtype}.gguf", tmp_path / "back", dtype="float32")
    ids = torch.tensor([[5, 17, 42, 99, 300, 7, 8, 250]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(ids).logits
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert 0 < err < tol, err


def test_dora_and_missing_base_are_refused(tmp_path, tiny_model_dir):
    adapter, _ = peft_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(FtkitError, match="dora adapter.*--merged"):
        export_lora(adapter, tmp_path / "d.gguf")
    lora, _ = peft_adapter(tiny_model_dir, tmp_path / "lora")
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FtkitError, match="--model"):
        export_lora(lora, tmp_path / "x.gguf")
    assert export_lora(lora, tmp_path / "x.gguf", model=str(tiny_model_dir))["modules"] == 14


def test_cli_export(tmp_path, tiny_model_dir):
    adapter, _ = peft_adapter(tiny_model_dir, tmp_path / "adapter")
    cmd = [sys.executable, "-m", "ftkit.cli", "export", str(adapter), "--format", "gguf", "--json"]
    env = {"PYTHONPATH": PYTHONPATH, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["gguf"] == str(tmp_path / f"{tmp_path.name}-lora-f32.gguf") and result["bytes"] > 0
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "--force" in json.loads(again.stdout)["error"]


# ---- every family ----------------------------------------------------------------------------------
# What llama.cpp calls each family's architecture and tensors, written out here rather than taken from
# the gguf maps the exporter uses, so that a wrong mapping shows.
GGUF_ARCH = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "granite": "granite", "smollm3": "smollm3",
    "qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
    "phi3": "phi3", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "olmo2": "olmo2",
    "olmo3": "olmo2", "cohere": "command-r", "starcoder2": "starcoder2",
}
GGUF_TENSOR = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up", "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.experts.gate_proj": "ffn_gate_exps",
    "mlp.experts.up_proj": "ffn_up_exps", "mlp.experts.down_proj": "ffn_down_exps",
    "block_sparse_moe.experts.w1": "ffn_gate_exps", "block_sparse_moe.experts.w3": "ffn_up_exps",
    "block_sparse_moe.experts.w2": "ffn_down_exps",
}
# llama.cpp's "normal" RoPE reads q/k rows in interleaved pairs: its converter reorders these families' rows.
ROPE_PERMUTED = {"llama", "mistral", "mixtral", "granite", "smollm3"}
GEMMAS = {"gemma", "gemma2", "gemma3_text"}
# Settings llama.cpp's architecture hard-codes: qwen3moe always renormalises the chosen experts' weights,
# olmoe has no grouped-query attention; the tiny defaults differ.
MERGED_OVERRIDES = {"qwen3_moe": {"norm_topk_prob": True}, "olmoe": {"num_key_value_heads": 4}}
FAMILY_NAMES = sorted(GGUF_ARCH)
EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<index>\d+)\.(?P<leaf>\w+)$")


def test_the_family_list_is_the_tiny_models_list():
    assert set(FAMILY_NAMES) == set(TINY_FAMILIES) == set(gguf_arch.FAMILIES)


@pytest.fixture(scope="session")
def family_model(tmp_path_factory, tokenizer_dir):
    """Tiny models of each family, built once a session (name, overrides) -> folder."""
    built = {}

    def get(name, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in built:
            built[key] = build_family(name, tmp_path_factory.mktemp(name), tokenizer_dir, **overrides)
        return built[key]

    return get


def adapted_modules(model_dir):
    """What a LoRA can adapt in the saved model: every 2-D weight in a block but the routers, with each
    expert of a mixture as its own module (older transformers' and PEFT's per-expert layout)."""
    weights = read_safetensors(model_dir / "model.safetensors")
    shapes = {}
    for key, w in weights.items():
        module = key.removesuffix(".weight")
        if ".layers." in key and key.endswith(".weight") and w.ndim == 2 and not module.endswith((".mlp.gate", ".block_sparse_moe.gate")):
            shapes[module] = w.shape
    return weights, shapes


def write_family_adapter(model_dir, dest, r=4, alpha=8.0, seed=0, std=0.3):
    """A PEFT-layout LoRA on every adaptable module of the model, A and B drawn nonzero."""
    rng = np.random.default_rng(seed)
    _, shapes = adapted_modules(model_dir)
    lora = LoraAdapter(kind="lora", scale=alpha / r, dropout=0.0)
    for module, (out, inp) in shapes.items():
        lora.a[module] = rng.normal(0, std, (r, inp)).astype(np.float32)
        lora.b[module] = rng.normal(0, 0.3, (out, r)).astype(np.float32)
    write_adapter(dest, lora_config("lora", r, alpha, 0.0, sorted(shapes), str(model_dir)), lora)
    return dest, lora


def expected_name(module):
    """HF module path -> (gguf base tensor name, expert index or None)."""
    expert = EXPERT.match(module)
    index = None
    if expert:
        module, index = f"{expert['head']}.{expert['leaf']}", int(expert["index"])
    block, rest = module.split(".layers.", 1)[1].split(".", 1)
    return f"blk.{block}.{GGUF_TENSOR[rest]}.weight", index


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lora_gguf_of_every_family(tmp_path, family_model, name):
    model_dir = family_model(name)
    cfg = json.loads((model_dir / "config.json").read_text())
    adapter, lora = write_family_adapter(model_dir, tmp_path / "adapter")
    out = export_lora(adapter, tmp_path / "a.gguf")
    got = read_gguf(tmp_path / "a.gguf")
    f = got["fields"]
    assert f["general.architecture"] == out["architecture"] == GGUF_ARCH[name]
    assert f["general.type"] == "adapter" and f["adapter.type"] == "lora" and f["adapter.lora.alpha"] == 8.0
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    names = set()
    for module in lora.modules:
        gname, expert = expected_name(module)
        names.add(gname)
        a, b = lora.a[module], lora.b[module]
        leaf = module.rsplit(".", 1)[-1]
        if name in ROPE_PERMUTED and leaf in heads:
            b = to_gguf_rope_order(b, heads[leaf])
        ga, gb = got["tensors"][f"{gname}.lora_a"][0], got["tensors"][f"{gname}.lora_b"][0]
        if expert is not None:  # stacked: one (n_expert, ...) pair per projection
            assert ga.shape[0] == gb.shape[0] == TINY_FAMILIES[name].get("num_local_experts", TINY_FAMILIES[name].get("num_experts"))
            ga, gb = ga[expert], gb[expert]
        np.testing.assert_array_equal(ga, a, err_msg=module)
        np.testing.assert_array_equal(gb, b, err_msg=module)
    assert set(got["tensors"]) == {f"{g}.lora_{p}" for g in names for p in "ab"}
    assert out["modules"] == len(names)
    if name in MOE_FAMILIES:
        assert any("_exps." in g for g in names)


def fused_folder(model_dir, lora, dest):
    """The model with W + alpha / r * B A on every adapted weight, computed here in Hugging Face's layout."""
    weights, _ = adapted_modules(model_dir)
    for module in lora.modules:
        weights[f"{module}.weight"] = weights[f"{module}.weight"] + lora.scale * lora.b[module] @ lora.a[module]
    dest.mkdir()
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, dest / f.name)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    return dest


def assert_lora_on_base_is_fused(tmp_path, model_dir, adapter, scale, fused_dir):
    """Export the adapter, the base and the fused model; the LoRA GGUF applied to the base GGUF as llama.cpp
    applies it (W + alpha / r * B A, expert by expert) must be the fused GGUF. Returns the base GGUF."""
    export_lora(adapter, tmp_path / "lora.gguf")
    base_out = export_merged(model_dir, tmp_path / "base.gguf", outtype="f32")
    export_merged(fused_dir, tmp_path / "fused.gguf", outtype="f32")
    base, fused = read_gguf(tmp_path / "base.gguf"), read_gguf(tmp_path / "fused.gguf")["tensors"]
    adapter_tensors = read_gguf(tmp_path / "lora.gguf")["tensors"]
    assert base_out["architecture"] == base["fields"]["general.architecture"]
    assert set(base["tensors"]) == set(fused)
    applied = 0
    for tensor, (w, _) in base["tensors"].items():
        w = w.astype(np.float64)
        if f"{tensor}.lora_a" in adapter_tensors:
            a, b = adapter_tensors[f"{tensor}.lora_a"][0], adapter_tensors[f"{tensor}.lora_b"][0]
            w = w + scale * np.matmul(b.astype(np.float64), a.astype(np.float64))
            applied += 1
        np.testing.assert_allclose(w, fused[tensor][0], atol=2e-5, err_msg=tensor)
    assert applied == len(adapter_tensors) // 2
    return base


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lora_gguf_on_the_base_gguf_is_the_fused_gguf_for_every_family(tmp_path, family_model, name):
    model_dir = family_model(name, **MERGED_OVERRIDES.get(name, {}))
    adapter, lora = write_family_adapter(model_dir, tmp_path / "adapter")
    base = assert_lora_on_base_is_fused(tmp_path, model_dir, adapter, lora.scale, fused_folder(model_dir, lora, tmp_path / "fused"))
    assert base["fields"]["general.architecture"] == GGUF_ARCH[name]

    # The base weights themselves, in llama.cpp's layout.
    cfg = json.loads((model_dir / "config.json").read_text())
    hf = read_safetensors(model_dir / "model.safetensors")
    q = hf["model.layers.1.self_attn.q_proj.weight"] if name != "phi3" else None
    if q is not None:
        want = to_gguf_rope_order(q, cfg["num_attention_heads"]) if name in ROPE_PERMUTED else q
        np.testing.assert_array_equal(base["tensors"]["blk.1.attn_q.weight"][0], want)
    shift = 1.0 if name in GEMMAS else 0.0  # Gemma's RMSNorm scales by 1 + w
    norms = {"output_norm.weight": "model.norm.weight", "blk.1.attn_norm.weight": "model.layers.1.input_layernorm.weight",
             "blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight"}
    for gname, key in norms.items():
        if key in hf:
            np.testing.assert_array_equal(base["tensors"][gname][0], hf[key] + shift, err_msg=gname)
    arch = GGUF_ARCH[name]
    f = base["fields"]
    assert (f[f"{arch}.block_count"], f[f"{arch}.attention.head_count"], f[f"{arch}.embedding_length"]) == (2, 4, 64)
    if name in MOE_FAMILIES:
        assert (f[f"{arch}.expert_count"], f[f"{arch}.expert_used_count"]) == (4, 2)
        assert base["tensors"]["blk.0.ffn_down_exps.weight"][0].shape[0] == 4


def test_family_metadata_llama_cpp_reads(tmp_path, family_model):
    """The keys llama.cpp's loaders take from the family (not the generic ones): soft-capping, sliding
    windows and their per-layer pattern, Granite's multipliers, Command R's logit scale."""
    want = {
        "gemma2": {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
                   "gemma2.attention.sliding_window": 32},
        "gemma3_text": {"gemma3.attention.sliding_window": 32, "gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 1e4},
        "olmo3": {"olmo2.attention.sliding_window": 32},
        "granite": {"granite.attention.scale": 0.25, "granite.embedding_scale": 2.0, "granite.residual_scale": 0.5,
                    "granite.logit_scale": 2.0},
        "cohere": {"command-r.logit_scale": 0.5, "command-r.attention.layer_norm_epsilon": 1e-5},
        "starcoder2": {"starcoder2.attention.layer_norm_epsilon": 1e-5},
        "qwen2_moe": {"qwen2moe.expert_feed_forward_length": 32, "qwen2moe.expert_shared_feed_forward_length": 32},
    }
    for name, keys in want.items():
        out = export_merged(family_model(name), tmp_path / f"{name}.gguf", outtype="f32")
        fields = read_gguf(out["gguf"])["fields"]
        for key, value in keys.items():
            assert fields.get(key) == pytest.approx(value), (name, key, fields.get(key))
    reader = gguf.GGUFReader(str(tmp_path / "gemma3_text.gguf"))
    assert list(reader.fields["gemma3.attention.sliding_window_pattern"].contents()) == [True, False]


def test_unsupported_family_or_setting_is_a_clean_error(tmp_path, family_model):
    base = tmp_path / "gptneox"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "num_hidden_layers": 2}))
    save_file({"gpt_neox.embed_in.weight": np.zeros((8, 8), np.float32)}, str(base / "model.safetensors"))
    lora = LoraAdapter(kind="lora", scale=2.0, dropout=0.0)
    lora.a["gpt_neox.layers.0.attention.dense"] = np.ones((4, 8), np.float32)
    lora.b["gpt_neox.layers.0.attention.dense"] = np.ones((8, 4), np.float32)
    adapter = tmp_path / "adapter"
    write_adapter(adapter, lora_config("lora", 4, 8.0, 0.0, lora.modules, str(base)), lora)
    with pytest.raises(FtkitError, match=r"model_type 'gpt_neox' is not supported.*supported: cohere, gemma, gemma2"):
        export_lora(adapter, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    # A setting llama.cpp's architecture hard-codes otherwise: the GGUF would compute another model.
    with pytest.raises(FtkitError, match="norm_topk_prob = False.*qwen3moe always renormalises"):
        export_merged(family_model("qwen3_moe"), tmp_path / "m.gguf", outtype="f32")
    with pytest.raises(FtkitError, match="num_key_value_heads = 2.*olmoe"):
        export_merged(family_model("olmoe"), tmp_path / "m.gguf", outtype="f32")
    assert not (tmp_path / "m.gguf").exists()
    # A sentencepiece vocabulary carried as BPE (byte fallback) is not a gpt2 one: llama.cpp would split it otherwise.
    spm = shutil.copytree(family_model("llama"), tmp_path / "spm")
    spec = json.loads((spm / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    (spm / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(FtkitError, match="sentencepiece-style"):
        export_merged(spm, tmp_path / "s.gguf", outtype="f32")


@pytest.mark.parametrize("name, experts", [(n, False) for n in FAMILY_NAMES] + [(n, True) for n in sorted(MOE_FAMILIES)])
def test_llama_cpp_runs_the_exports_as_transformers_does(tmp_path, family_model, name, experts):
    """Where llama.cpp's Python binding is installed (llama-cpp-python; CI has none): llama.cpp itself
    gives transformers' logits from the base GGUF, from the base GGUF with the LoRA GGUF on top, and
    from the fused GGUF. 40 tokens, past the tiny models' 32-token sliding windows; for the mixtures of
    experts also with a LoRA on the experts' parameters."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    base_dir = shutil.copytree(family_model(name, **MERGED_OVERRIDES.get(name, {})), tmp_path / "base")
    sharpen(base_dir)  # attention far from uniform, so that RoPE, window and mask errors change the logits
    if experts:
        adapter, lora, fused = expert_adapter(base_dir, name, tmp_path, std=0.1)
    else:
        adapter, lora = write_family_adapter(base_dir, tmp_path / "adapter", std=0.1)
        fused = fused_folder(base_dir, lora, tmp_path / "fused")
    export_lora(adapter, tmp_path / "lora.gguf")
    export_merged(base_dir, tmp_path / "base.gguf", outtype="f32")
    export_merged(fused, tmp_path / "fused.gguf", outtype="f32")
    ids = [int(i) for i in np.random.default_rng(1).integers(4, 500, 40)]

    def transformers_logits(folder):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()

    def llama_cpp_logits(model, lora_file=None):
        # An f32 KV cache: llama.cpp's default f16 one alone moves sharpened logits by ~1e-2.
        llm = llama_cpp.Llama(str(model), lora_path=lora_file and str(lora_file), n_ctx=64, n_batch=64, n_threads=2,
                              logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    want_base, want_fused = transformers_logits(base_dir), transformers_logits(fused)
    assert np.abs(want_fused - want_base).max() > 0.1 * np.abs(want_base).max()  # the adapter matters
    for what, got, want in (("base", llama_cpp_logits(tmp_path / "base.gguf"), want_base),
                            ("base + LoRA", llama_cpp_logits(tmp_path / "base.gguf", tmp_path / "lora.gguf"), want_fused),
                            ("fused", llama_cpp_logits(tmp_path / "fused.gguf"), want_fused)):
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 2e-3, (what, err)  # ~1e-6; up to 1e-3 where ggml's GELU reads an f16 table (Gemma, StarCoder2)


def saved_expert(name, layer, expert):
    """The checkpoint's keys for one expert's gate, up and down projections (Mixtral's w1, w3, w2)."""
    if name == "mixtral":
        head = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return {"gate": f"{head}.w1.weight", "up": f"{head}.w3.weight", "down": f"{head}.w2.weight"}
    head = f"model.layers.{layer}.mlp.experts.{expert}"
    return {p: f"{head}.{p}_proj.weight" for p in ("gate", "up", "down")}


def expert_adapter(model_dir, name, dest, std=0.3, r=4, n_exp=4):
    """ftkit's LoRA on transformers 5's expert parameters (`...mlp.experts.gate_up_proj`, `...down_proj`;
    per expert a (experts, r, in), b (experts, out, r)) and on q_proj, written as an adapter folder, and the
    model it fuses into, computed here on the checkpoint's per-expert weights. -> (adapter, lora, fused dir)"""
    cfg = json.loads((model_dir / "config.json").read_text())
    weights = read_safetensors(model_dir / "model.safetensors")
    rng = np.random.default_rng(3)
    inter, hidden = weights[saved_expert(name, 0, 0)["gate"]].shape
    lora = LoraAdapter(kind="lora", scale=2.0, dropout=0.0)
    for layer in range(cfg["num_hidden_layers"]):
        head = f"model.layers.{layer}"
        q = weights[f"{head}.self_attn.q_proj.weight"].shape
        lora.a[f"{head}.self_attn.q_proj"] = rng.normal(0, std, (r, q[1])).astype(np.float32)
        lora.b[f"{head}.self_attn.q_proj"] = rng.normal(0, 0.3, (q[0], r)).astype(np.float32)
        for param, (out, inp) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
            lora.a[f"{head}.mlp.experts.{param}"] = rng.normal(0, std, (n_exp, r, inp)).astype(np.float32)
            lora.b[f"{head}.mlp.experts.{param}"] = rng.normal(0, 0.3, (n_exp, out, r)).astype(np.float32)
    adapter = dest / "adapter"
    write_adapter(adapter, lora_config("lora", r, 2.0 * r, 0.0, lora.modules, str(model_dir), cfg["num_hidden_layers"]), lora)

    fused = dict(weights)
    for module in lora.modules:
        if ".experts." not in module:
            fused[f"{module}.weight"] = fused[f"{module}.weight"] + lora.scale * lora.b[module] @ lora.a[module]
            continue
        layer = int(module.split(".")[2])
        for e in range(n_exp):
            delta = lora.scale * lora.b[module][e] @ lora.a[module][e]
            keys = saved_expert(name, layer, e)
            if module.endswith("down_proj"):
                fused[keys["down"]] = fused[keys["down"]] + delta
            else:  # gate rows first
                fused[keys["gate"]] = fused[keys["gate"]] + delta[:inter]
                fused[keys["up"]] = fused[keys["up"]] + delta[inter:]
    fused_dir = dest / "fused"
    fused_dir.mkdir()
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, fused_dir / f.name)
    save_file(fused, str(fused_dir / "model.safetensors"), metadata={"format": "pt"})
    return adapter, lora, fused_dir


@pytest.mark.parametrize("name", sorted(MOE_FAMILIES))
def test_expert_parameter_lora_gguf(tmp_path, family_model, name):
    """gate_up's B splits into llama.cpp's ffn_gate_exps and ffn_up_exps (A shared), and the three stacked
    pairs on the base GGUF give the fused GGUF."""
    model_dir = family_model(name, **MERGED_OVERRIDES.get(name, {}))
    adapter, lora, fused_dir = expert_adapter(model_dir, name, tmp_path)
    assert_lora_on_base_is_fused(tmp_path, model_dir, adapter, lora.scale, fused_dir)
    got = read_gguf(tmp_path / "lora.gguf")["tensors"]
    for proj in ("gate", "up", "down"):
        a, b = got[f"blk.1.ffn_{proj}_exps.weight.lora_a"][0], got[f"blk.1.ffn_{proj}_exps.weight.lora_b"][0]
        assert a.shape[:2] == b.shape[::2] == (4, 4)
    source = lora.b["model.layers.1.mlp.experts.gate_up_proj"]
    np.testing.assert_array_equal(got["blk.1.ffn_up_exps.weight.lora_b"][0], source[:, source.shape[1] // 2:])


def test_merged_gguf_of_a_checkpoint_in_transformers_5_expert_layout(tmp_path, family_model):
    """A MoE checkpoint saved with 3-D `...experts.gate_up_proj` / `...experts.down_proj` gives the GGUF its
    per-expert twin gives."""
    model_dir = family_model("qwen2_moe")
    weights = read_safetensors(model_dir / "model.safetensors")
    packed = {k: v for k, v in weights.items() if ".mlp.experts." not in k}
    for layer in range(2):
        keys = [saved_expert("qwen2_moe", layer, e) for e in range(4)]
        packed[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([weights[k["gate"]], weights[k["up"]]]) for k in keys])
        packed[f"model.layers.{layer}.mlp.experts.down_proj"] = np.stack([weights[k["down"]] for k in keys])
    folder = tmp_path / "packed"
    folder.mkdir()
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    save_file(packed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    want = read_gguf(export_merged(model_dir, tmp_path / "a.gguf", outtype="f32")["gguf"])["tensors"]
    got = read_gguf(export_merged(folder, tmp_path / "b.gguf", outtype="f32")["gguf"])["tensors"]
    assert set(got) == set(want)
    for name, (w, _) in want.items():
        np.testing.assert_array_equal(got[name][0], w, err_msg=name)
