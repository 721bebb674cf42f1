"""ftkit export: a LoRA adapter as a llama.cpp GGUF adapter, and a fused model as GGUF (f32/f16/q8_0).

No llama.cpp here, so its side is done by hand, as llama.cpp does it: a GGUF LoRA applied to the base
model's GGUF (W + alpha / r * B @ A on the stored tensors) must give the fused model's GGUF; and the
fused GGUF, read back through `ftkit convert` (transformers' GGUF reader), must give PEFT's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from builders import PYTHONPATH

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")
peft = pytest.importorskip("peft")

from ftkit.common.errors import FtkitError
from ftkit.common.tensors import read_safetensors
from ftkit.models.convert import convert
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
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["gguf"] == str(tmp_path / f"{tmp_path.name}-lora-f32.gguf") and result["bytes"] > 0
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "--force" in json.loads(again.stdout)["error"]
