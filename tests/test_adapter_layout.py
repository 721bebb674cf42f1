"""The common adapter layout in the core: numpy only, no backend needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ftkit.adapters import init, targets
from ftkit.adapters import layout as adapter_layout
from ftkit.adapters.resolve import import_mlx_lm
from ftkit.common.errors import AdapterMismatchError, FtkitError
from ftkit.common.tensors import read_safetensors, write_safetensors
from ftkit.recipe.schema import MethodSection

PATHS = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")] + ["lm_head"]


def lora(modules, r=2, din=6, dout=4, dora=False, seed=0):
    rng = np.random.default_rng(seed)
    out = adapter_layout.LoraAdapter(kind="dora" if dora else "lora", scale=2.0, dropout=0.0)
    for m in modules:
        out.a[m] = rng.normal(size=(r, din)).astype(np.float32)
        out.b[m] = rng.normal(size=(dout, r)).astype(np.float32)
        if dora:
            out.m[m] = rng.random(dout).astype(np.float32)
    return out


def test_select_all_linear_last_layers_and_names():
    assert targets.select(PATHS, MethodSection(), 3) == sorted(p for p in PATHS if p != "lm_head")
    assert targets.select(PATHS, MethodSection(layers=1), 3) == sorted(p for p in PATHS if ".2." in p)
    assert targets.select(PATHS, MethodSection(targets=["q_proj", "mlp.down_proj"]), 3) == sorted(
        p for p in PATHS if p.endswith(("q_proj", "down_proj")))
    with pytest.raises(FtkitError, match=r"\['qproj'\] match no linear layer.*'q_proj'"):
        targets.select(PATHS, MethodSection(targets=["qproj"]), 3)


def test_target_spec_is_leaf_names_when_it_can_be_and_exact_paths_otherwise():
    every = [p for p in PATHS if p != "lm_head"]
    assert adapter_layout.target_spec(every, 3) == (["down_proj", "q_proj", "v_proj"], None)
    last = [p for p in every if ".2." in p]
    assert adapter_layout.target_spec(last, 3) == (["down_proj", "q_proj", "v_proj"], [2])
    ragged = every[:4]  # layer 0 whole, one module of layer 1
    assert adapter_layout.target_spec(ragged, 3) == (sorted(ragged), None)


def test_mlx_layout_round_trip_transposes_and_renames():
    src = lora(["model.layers.0.self_attn.q_proj"], dora=True)
    native = adapter_layout.to_mlx(src)
    assert native["model.layers.0.self_attn.q_proj.lora_a"].shape == (6, 2)  # (in, r)
    assert native["model.layers.0.self_attn.q_proj.lora_b"].shape == (2, 4)  # (r, out)
    assert "model.layers.0.self_attn.q_proj.m" in native
    back = adapter_layout.from_mlx(native, "dora", 2.0, 0.0)
    for part in ("a", "b", "m"):
        np.testing.assert_array_equal(getattr(back, part)["model.layers.0.self_attn.q_proj"], getattr(src, part)["model.layers.0.self_attn.q_proj"])


def test_written_folder_reads_back_and_names_peft_keys(tmp_path):
    src = lora(["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"])
    cfg = adapter_layout.lora_config("lora", 2, 4.0, 0.0, src.modules, "base", all_layers=3)
    adapter_layout.write_adapter(tmp_path, cfg, src)
    keys = sorted(read_safetensors(tmp_path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    config, back = adapter_layout.read_adapter(tmp_path)
    assert (config["target_modules"], config["layers_to_transform"]) == (["q_proj", "v_proj"], [1])
    assert back.scale == 2.0 and back.modules == src.modules


def test_bfloat16_tensors_read_as_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, len(raw)]}}).encode()
    (tmp_path / "t.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw)
    np.testing.assert_array_equal(read_safetensors(tmp_path / "t.safetensors")["x"], values)


def test_mlx_lm_folder_is_imported_with_alpha_from_scale(tmp_path):
    native = adapter_layout.to_mlx(lora(["model.layers.2.mlp.down_proj"], r=8))
    write_safetensors(tmp_path / "adapters.safetensors", native)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.05}, "model": "m"}))
    out = tmp_path / "peft"
    import_mlx_lm(tmp_path, out)
    config, back = adapter_layout.read_adapter(out)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["base_model_name_or_path"]) == (8, 160.0, 0.05, "m")
    assert back.scale == pytest.approx(20.0)


def test_foreign_folders_that_cannot_be_read_say_why(tmp_path):
    (tmp_path / "adapters.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full"}))
    with pytest.raises(AdapterMismatchError, match="'full' fine-tune, not an adapter"):
        import_mlx_lm(tmp_path, tmp_path / "out")
    peft = tmp_path / "p"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"q_proj": 4}}))
    write_safetensors(peft / "adapter_model.safetensors", {"x": np.zeros(1, np.float32)})
    with pytest.raises(AdapterMismatchError, match="rank_pattern"):
        adapter_layout.read_adapter(peft)


def test_check_fits_names_the_module_and_shapes(tmp_path):
    src = lora(["model.layers.0.self_attn.q_proj"])
    adapter_layout.check_fits(tmp_path, src, {"model.layers.0.self_attn.q_proj": (4, 6)}, hidden=6)
    with pytest.raises(AdapterMismatchError, match=r"q_proj maps 8 -> 4"):
        adapter_layout.check_fits(tmp_path, src, {"model.layers.0.self_attn.q_proj": (4, 8)}, hidden=8)
    with pytest.raises(AdapterMismatchError, match="does not have"):
        adapter_layout.check_fits(tmp_path, src, {}, hidden=6)


def test_initial_values_depend_on_seed_and_name_only():
    shapes = {"base_model.model.a.lora_A.weight": np.ones((2, 16)), "base_model.model.a.lora_B.weight": np.ones((4, 2)),
              "base_model.model.b.lora_A.weight": np.ones((2, 16)), "base_model.model.a.lora_magnitude_vector": np.ones(4)}
    one = init.draw(shapes, seed=0)
    reordered = init.draw(dict(reversed(list(shapes.items()))), seed=0)
    for k in shapes:
        np.testing.assert_array_equal(one[k], reordered[k])
    assert not np.array_equal(one["base_model.model.a.lora_A.weight"], one["base_model.model.b.lora_A.weight"])
    assert not np.array_equal(one["base_model.model.a.lora_A.weight"], init.draw(shapes, seed=1)["base_model.model.a.lora_A.weight"])
    assert np.abs(one["base_model.model.a.lora_A.weight"]).max() <= 0.25  # 1/sqrt(16)
    assert not one["base_model.model.a.lora_B.weight"].any()
    np.testing.assert_array_equal(one["base_model.model.a.lora_magnitude_vector"], np.ones(4))  # kept: the base's row norms


def test_method_layers_beyond_the_model_is_an_error_not_a_clamp():
    """Checked where both backends select modules, so hub and GGUF models (no local config.json at
    recipe time) are refused too."""
    from ftkit.adapters.targets import select
    from ftkit.recipe.schema import MethodSection

    paths = [f"model.layers.{i}.self_attn.q_proj" for i in range(5)]
    assert select(paths, MethodSection(layers=2), 5) == paths[3:]
    with pytest.raises(FtkitError, match=r"method.layers = 16, but this model has 5 decoder blocks"):
        select(paths, MethodSection(layers=16), 5)
