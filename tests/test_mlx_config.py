"""The MLX backend computes every family's logits as transformers does, or refuses (ftkit.models.mlx_config
+ ftkit_mlx.patches).

Each model is one of tests/families.py, saved by transformers 5 (rope_parameters, num_local_experts ...),
with sharpened attention so that a wrong window or RoPE moves the logits. Torch: transformers in float32;
MLX: ftkit's load path (model_io.load_base). Sequences run past the sliding windows (32) and past a
LongRoPE original context (64). The first tests need neither torch nor MLX: they read the translation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from families import FAMILIES

from ftkit.common.errors import FtkitError
from ftkit.models import mlx_config

ATOL = 1e-4
LONG = 96  # past the windows (32) and the LongRoPE original context (64)
F8 = [1.0, 1.1, 1.3, 1.7, 2.0, 2.5, 3.0, 4.0]  # LongRoPE factors for a 16-wide head
LONGROPE = {"rope_type": "longrope", "short_factor": F8, "long_factor": [2 * f for f in F8], "rope_theta": 10000.0}


def rope(kind: str, **keys) -> dict:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **keys}}


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
YARN = dict(factor=8.0, original_max_position_embeddings=64)
# name -> (family, build_family overrides): windows and RoPE scalings mlx-lm reads another way or not at all
VARIANTS: dict[str, tuple[str, dict]] = {
    "mistral-window": ("mistral", dict(sliding_window=32)),
    "mixtral-window": ("mixtral", dict(sliding_window=32)),
    "starcoder2-window": ("starcoder2", dict(sliding_window=32)),
    "phi3-window": ("phi3", dict(sliding_window=32)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=1)),
    "qwen3_moe-window": ("qwen3_moe", dict(use_sliding_window=True, sliding_window=32)),
    "qwen2_moe-window": ("qwen2_moe", dict(use_sliding_window=True, sliding_window=32, max_window_layers=2)),
    "smollm3-window": ("smollm3", dict(use_sliding_window=True, sliding_window=32, no_rope_layer_interval=2)),
    "gemma3_text-all-sliding": ("gemma3_text", dict(sliding_window_pattern=3)),
    "olmo3-all-sliding-yarn": ("olmo3", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})),
    # OLMo 3's own configs spell out the attention factor yarn derives (0.1 ln 4 + 1)
    "olmo3-4-layers-yarn": ("olmo3", dict(num_hidden_layers=4, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                                                             "attention_factor": 0.1 * np.log(4.0) + 1})),
    "llama-linear": ("llama", rope("linear", factor=4.0)),
    "llama-llama3": ("llama", rope("llama3", **LLAMA3)),
    "llama-yarn": ("llama", rope("yarn", **YARN)),
    "llama-yarn-attention-factor": ("llama", rope("yarn", attention_factor=1.5, **YARN)),
    "llama-dynamic": ("llama", dict(max_position_embeddings=128, **rope("dynamic", factor=4.0))),
    "gemma3_text-linear": ("gemma3_text", dict(rope_scaling={"rope_type": "linear", "factor": 8.0})),
    # sqrt(80) is not a bfloat16 number: mlx-lm rounds Gemma 3's embedding scale to one, transformers does not in fp32
    "gemma3_text-hidden80": ("gemma3_text", dict(hidden_size=80)),
    "phi3-longrope": ("phi3", dict(rope_parameters=LONGROPE, original_max_position_embeddings=64)),
    "phi3-longrope-partial": ("phi3", dict(original_max_position_embeddings=64, rope_parameters={
        **LONGROPE, "short_factor": F8[:6], "long_factor": [2 * f for f in F8[:6]], "partial_rotary_factor": 0.75})),
    "gemma-linear": ("gemma", rope("linear", factor=4.0)),
    "gemma2-linear": ("gemma2", rope("linear", factor=4.0)),
    "cohere-llama3": ("cohere", rope("llama3", **LLAMA3)),
    "mixtral-yarn": ("mixtral", dict(head_dim=16, **rope("yarn", **YARN))),
    "qwen3_moe-yarn": ("qwen3_moe", rope("yarn", factor=4.0, original_max_position_embeddings=128)),
}


# ------------------------------------------------------------------------------------ the translation


def base(model_type: str, **keys) -> dict:
    return {"model_type": model_type, "num_hidden_layers": 2, "max_position_embeddings": 512, **keys}


def test_transformers5_keys_read_where_mlx_lm_reads_them():
    moe = mlx_config.plan(base("qwen3_moe", num_local_experts=4, rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
    assert moe.overrides["num_experts"] == 4 and moe.overrides["rope_theta"] == 1e4 and not moe.patches
    olmo3 = mlx_config.plan(base("olmo3", sliding_window=32, layer_types=["sliding_attention", "full_attention"], rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 5e5}, "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}))
    assert olmo3.overrides["rope_theta"] == 5e5 and olmo3.overrides["sliding_window"] == 32 and not olmo3.patches
    gemma3 = mlx_config.plan(base("gemma3_text", sliding_window=32, layer_types=["sliding_attention", "full_attention"], rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8, "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    assert gemma3.overrides["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 8.0}
    assert (gemma3.overrides["rope_theta"], gemma3.overrides["rope_local_base_freq"], gemma3.overrides["sliding_window_pattern"]) == (1e6, 1e4, 2)
    assert not gemma3.patches


def test_scalings_resolved_as_transformers_resolves_them():
    llama3 = mlx_config.plan(base("llama", rope_parameters={"rope_type": "llama3", "factor": 8, "rope_theta": 5e5}))
    assert llama3.overrides["rope_scaling"] == {"type": "llama3", "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 512}
    yarn = mlx_config.plan(base("qwen3", rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 128,
                                                      "beta_fast": None, "mscale": 0.7}))
    assert yarn.overrides["rope_scaling"] == {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                              "beta_fast": 32, "beta_slow": 1}  # mscale only counts with mscale_all_dim
    derived = mlx_config.plan(base("llama", **rope("yarn", factor=8.0, attention_factor=0.1 * np.log(8.0) + 1)))
    assert "attention_factor" not in derived.overrides["rope_scaling"] and not derived.patches
    given = mlx_config.plan(base("llama", **rope("yarn", factor=8.0, attention_factor=1.5)))
    assert given.overrides["rope_scaling"] is None and given.patches[0].rope.scaling["attention_factor"] == 1.5
    # a 4.x Phi-3.5 config: LongRoPE patched in (mlx-lm's is always long), the original length beside rope_scaling
    phi = mlx_config.plan(base("phi3", rope_theta=1e4, original_max_position_embeddings=64, sliding_window=48,
                               rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}))
    scaling = phi.patches[0].rope.scaling
    assert scaling["original_max_position_embeddings"] == 64
    assert scaling["attention_factor"] == pytest.approx((1 + np.log(512 / 64) / np.log(64)) ** 0.5)
    assert phi.overrides["rope_scaling"] is None and [p.window for p in phi.patches.values()] == [48, 48]


def test_windows_and_ropes_mlx_lm_ignores_are_patched_per_layer():
    mistral = mlx_config.plan(base("mistral", sliding_window=32))
    assert {i: p.window for i, p in mistral.patches.items()} == {0: 32, 1: 32}
    assert mistral.overrides["layer_types"] == ["full_attention"] * 2  # its Llama class needs a full layer
    gemma2 = mlx_config.plan(base("gemma2", sliding_window=32, **rope("linear", factor=2.0)))
    assert [(i, p.window, p.rope.kind) for i, p in gemma2.patches.items()] == [(0, 32, "linear"), (1, None, "linear")]
    olmo3 = mlx_config.plan(base("olmo3", sliding_window=32))  # 2 layers: both sliding in transformers
    assert olmo3.overrides["layer_types"] == ["sliding_attention", "full_attention"] and olmo3.patches[1].window == 32
    smol = mlx_config.plan(base("smollm3", use_sliding_window=True, sliding_window=32, no_rope_layers=[1, 0]))
    assert smol.overrides["layer_types"] == ["full_attention", "sliding_attention"] and not smol.patches
    assert not mlx_config.plan(base("qwen2", sliding_window=4096, use_sliding_window=False)).patches


def test_nested_text_config_translated():
    p = mlx_config.plan({"model_type": "gemma3", "text_config": {**base("gemma3_text", num_hidden_layers=6), "rope_theta": 1e6,
                                                                "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                                                                "rope_local_base_freq": 1e4, "sliding_window": 512}})
    text = p.overrides["text_config"]
    assert text["rope_scaling"]["factor"] == 8.0 and text["sliding_window_pattern"] == 6 and text["rope_local_base_freq"] == 1e4


@pytest.mark.parametrize("config, words", [
    (base("llama", **rope("proportional", factor=2.0)), ["llama", "proportional", "--backend torch"]),
    (base("mixtral", **rope("yarn", factor=4.0, truncate=False)), ["mixtral", "yarn", "truncate"]),
    (base("gemma3_text", num_hidden_layers=3, sliding_window=32,
          layer_types=["sliding_attention", "full_attention", "full_attention"]), ["gemma3_text", "layer_types"]),
    (base("olmo3", sliding_window=32, layer_types=["full_attention"] * 2), ["olmo3", "sliding"]),
    (base("gemma3_text", use_bidirectional_attention=True), ["gemma3_text", "use_bidirectional_attention"]),
])
def test_refused_with_the_family_and_the_setting(config, words):
    with pytest.raises(FtkitError) as e:
        mlx_config.plan(config)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_dynamic_rope_refuses_lengths_past_max_position_embeddings():
    config = base("qwen2", max_position_embeddings=4096, **rope("dynamic", factor=2.0))
    mlx_config.check_context(config, 4096)
    with pytest.raises(FtkitError, match=r"data.max_seq_length = 8192 .*qwen2 uses dynamic RoPE.*<= 4096"):
        mlx_config.check_context(config, 8192)
    mlx_config.check_context(base("phi3", sliding_window=32), 100_000)  # windows and LongRoPE are patched, not limited


# --------------------------------------------------------------------------------- the same logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_dir):
    """Sharpened tiny models by name (a family, or a VARIANTS key), each built once."""
    pytest.importorskip("torch")
    pytest.importorskip("mlx_lm")
    from families import sharpened_models

    return sharpened_models(tmp_path_factory.mktemp("mlx-config"), tokenizer_dir, VARIANTS)


@pytest.fixture(scope="module")
def engines():
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    from ftkit_mlx import model_io
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def torch_model(folder):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def mlx_model(folder):
        model, _ = model_io.load_base(folder)
        model.set_dtype(mx.float32)
        return model

    yield torch, mx, torch_model, mlx_model
    torch.set_num_threads(threads)


def ids(n: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 500, (rows, n))


def compare(engines, folder: Path, n: int = LONG) -> float:
    torch, mx, torch_model, mlx_model = engines
    x = ids(n)
    with torch.no_grad():
        want = torch_model(folder)(torch.tensor(x)).logits.numpy()
    got = np.array(mlx_model(folder)(mx.array(x)))
    return float(np.abs(want - got).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_from_a_transformers5_folder(folders, engines, family):
    assert compare(engines, folders(family)) < ATOL


@pytest.mark.parametrize("name", VARIANTS)
def test_windows_and_rope_scalings(folders, engines, name):
    assert compare(engines, folders(name)) < ATOL


def test_longrope_short_factors_within_the_original_context(folders, engines):
    config = json.loads((folders("phi3-longrope") / "config.json").read_text())
    assert config["original_max_position_embeddings"] == 64
    assert compare(engines, folders("phi3-longrope"), n=48) < ATOL  # mlx-lm alone: 0.72 (long factors)


PACKED_ROWS = [[40, 30], [20, 30, 10]]  # every example within the LongRoPE original context (64), rows past it


@pytest.mark.parametrize("name", ["mistral-window", "gemma2", "gemma3_text", "olmo3", "qwen2-window", "phi3-longrope"])
def test_packed_batches(folders, engines, name):
    """ftkit's packed rows: the block-diagonal mask keeps the window (and Gemma 2's mask its axes), and
    LongRoPE picks its factors by the longest example, as transformers does from the position ids."""
    torch, mx, torch_model, mlx_model = engines
    from ftkit_mlx import methods

    width = max(sum(r) for r in PACKED_ROWS)
    positions = np.array([np.concatenate([np.arange(n) for n in row] + [np.arange(width - sum(row))]) for row in PACKED_ROWS])
    x = ids(width, len(PACKED_ROWS))
    with torch.no_grad():
        want = torch_model(folders(name))(input_ids=torch.tensor(x), position_ids=torch.tensor(positions), use_cache=False).logits.numpy()
    model = mlx_model(folders(name))
    got = np.array(model(mx.array(x), cache=methods.packed_attention(positions, len(model.layers))))
    assert np.abs(want - got).max() < ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral-window", "gemma2", "olmo3-all-sliding-yarn", "phi3-longrope"])
def test_generation_with_a_kv_cache(folders, engines, name):
    """Token by token past the window and the original context, as transformers' cache does it."""
    torch, mx, torch_model, mlx_model = engines
    from mlx_lm.models.cache import make_prompt_cache

    x, prompt = ids(80)[0].tolist(), 40
    tm, mm = torch_model(folders(name)), mlx_model(folders(name))
    with torch.no_grad():
        out = tm(torch.tensor([x[:prompt]]), use_cache=True)
        want, past = [out.logits[0].numpy()], out.past_key_values
        for t in x[prompt:]:
            out = tm(torch.tensor([[t]]), cache=past, use_cache=True)
            want.append(out.logits[0].numpy())
            past = out.past_key_values
    cache = make_prompt_cache(mm)
    got = [np.array(mm(mx.array([x[:prompt]]), cache=cache)[0])]
    got += [np.array(mm(mx.array([[t]]), cache=cache)[0]) for t in x[prompt:]]
    assert np.abs(np.concatenate(want) - np.concatenate(got)).max() < ATOL


def test_loading_keeps_the_config_and_the_parameters(folders, engines):
    """The translation is for mlx-lm only: the config handed back (saved by fuse / full fine-tuning) is
    config.json's, and the patches add no parameter."""
    from ftkit_mlx import model_io
    from mlx.utils import tree_flatten

    folder = folders("phi3-longrope")
    model, config = model_io.load_base(folder)
    assert config["rope_parameters"]["rope_type"] == "longrope" and "rope_scaling" not in config
    assert not [k for k, _ in tree_flatten(model.parameters()) if "rope" in k]


def test_backend_refuses_the_length_before_loading(tmp_path, small_data):
    """data.max_seq_length past what MLX computes alike is refused from config.json, weights unread."""
    pytest.importorskip("mlx_lm")
    from builders import recipe_file
    from ftkit_mlx.backend import MlxBackend

    from ftkit.recipe.load import load_recipes

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(base("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                       rms_norm_eps=1e-5, vocab_size=512, max_position_embeddings=128,
                                                       **rope("dynamic", factor=2.0))))
    (recipe,) = load_recipes([recipe_file(tmp_path, model, small_data, data={"max_seq_length": 256})])
    with pytest.raises(FtkitError, match=r"data.max_seq_length = 256 .*dynamic RoPE"):
        MlxBackend().load(recipe, model, adapter=None, train=True)
