"""LoRA and DoRA on every model family of tests/families.py, on both backends, from one recipe.

For each family a tiny model (random weights, query/key sharpened so that positions and masks matter;
the MoE families with targets = "all-linear": attention and shared experts, not the routed experts)
trains a few steps on torch (PEFT) and on MLX (mlx-lm) from the same recipe and seed, and:

a. the training losses agree step by step (relative 1e-5); the two adapters have the same names and
   configs, their tensors within a fraction of one optimizer step;
b. the adapter each backend trained gives the same logits on the other backend (1e-4);
c. plain PEFT (`PeftModel.from_pretrained`) loads it whole and gives the same logits;
d. `fuse` on either backend writes a folder transformers reads with no missing or unexpected keys,
   giving the adapter's logits (slow);
e. QLoRA (model.quantize = "4bit": nf4 through bitsandbytes on torch, MLX's 4-bit on MLX) trains with a
   finite, falling loss and saves an adapter that loads on its quantized base, and on the float base on
   both backends and in PEFT with the same logits; the QLoRA losses differ between the backends by
   design (two quantizers), so they are not compared (slow).

Long sequences: LoRA on the families with sliding windows or LongRoPE (Mistral with a 16-token window,
Gemma 2, Phi-3 with LongRoPE and a 64-token original context) trains on examples past the window and
the original context, packed and padded, with the same losses and logits on both backends; the same
weights without the window / the scaling give other logits on that text, so the agreement is not for
nothing (slow).

Runtime (2 CPU cores shared with other jobs): the LoRA part (not slow) 60-80 s, the whole file 2-3 min.
Set FTKIT_FAMILY_TABLE=path to get every figure measured (families x checks) as a Markdown table.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytest.importorskip("peft")

from builders import recipe_file
from families import FAMILIES, sharpened_models

from ftkit.common.tensors import read_safetensors
from ftkit.evaluate.inference import load_for_inference
from ftkit.models.tokenizer import load_tokenizer
from ftkit.recipe.load import build_recipe, load_recipes
from ftkit.train.loop import Trainer
from ftkit.train.prepare import prepare

FAMILY_NAMES = list(FAMILIES)
BACKENDS = ("torch", "mlx")
STEPS = 3
LR = 1e-2
LOSS_RTOL = 1e-5
LOGITS_ATOL = 1e-4
# Past the tiny models' 32-token sliding windows.
TEXT = "table: 1-10015132-11\ncolumns: Player, No., Nationality, Position, Years in Toronto\nQ: Which player wore number 4?\nA: SELECT"
F8 = [1.0, 1.1, 1.3, 1.7, 2.0, 2.5, 3.0, 4.0]  # LongRoPE factors for a 16-wide head
LONGROPE = {"rope_type": "longrope", "short_factor": F8, "long_factor": [2 * f for f in F8], "rope_theta": 10000.0}
# name -> (family, build_family overrides): the windows and LongRoPE that long sequences must get right
LONG_VARIANTS: dict[str, tuple[str, dict]] = {
    "mistral-window16": ("mistral", {"sliding_window": 16}),
    "gemma2": ("gemma2", {}),  # window 32 on every other layer, soft-capping
    "phi3-longrope64": ("phi3", {"rope_parameters": LONGROPE, "original_max_position_embeddings": 64}),
    "gemma2-no-window": ("gemma2", {"sliding_window": 4096}),
}
# each long case and its twin: the same weights (same seed) without the window or the LongRoPE scaling
TWINS = {"mistral-window16": "mistral", "gemma2": "gemma2-no-window", "phi3-longrope64": "phi3"}

# (family or variant, column) -> the figure measured; written out at the end when FTKIT_FAMILY_TABLE is set
FIGURES: dict[str, dict[str, str]] = defaultdict(dict)


def record(name: str, column: str, value: float, fmt: str = "{:.1e}") -> float:
    FIGURES[name][column] = fmt.format(value)
    return value


@pytest.fixture(scope="module", autouse=True)
def quick_and_reported():
    """One torch thread (the models are tiny; on a shared 2-core machine two threads are 3x slower)
    and no loss plot per run (half a second of matplotlib each, nothing this file checks). At the end,
    the figures as a table where FTKIT_FAMILY_TABLE asks for one."""
    import ftkit.train.metrics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    patch.setattr(ftkit.train.metrics, "plot_losses", lambda *a, **k: None)
    yield
    patch.undo()
    torch.set_num_threads(threads)
    out = os.environ.get("FTKIT_FAMILY_TABLE")
    if out and FIGURES:
        columns = sorted({c for row in FIGURES.values() for c in row})
        lines = ["| family | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(row.get(c, "") for c in columns) + " |" for name, row in FIGURES.items()]
        Path(out).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- models, data, runs


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """Sharpened tiny models by name (a family, or a LONG_VARIANTS key), each built once."""
    return sharpened_models(tmp_path_factory.mktemp("families"), tokenizer_dir, LONG_VARIANTS)


def write_data(d: Path, wikisql: Path, cut) -> Path:
    for split, n in (("train", 8), ("valid", 2), ("test", 2)):
        texts = [json.loads(line)["text"] for line in (wikisql / f"{split}.jsonl").read_text().splitlines()[:n]]
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": cut(i, t)}) for i, t in enumerate(texts)) + "\n")
    return d


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory, wikisql_dir) -> dict[str, Path]:
    """short: 8 WikiSQL rows cut to 30-85 tokens (past the 32-token windows, quick to train);
    long: the whole rows, 95-170 tokens (past a 16-token window and a 64-token LongRoPE context)."""
    return {
        "short": write_data(tmp_path_factory.mktemp("short"), wikisql_dir, lambda i, t: t[: 80 + 30 * (i % 3)]),
        "long": write_data(tmp_path_factory.mktemp("long"), wikisql_dir, lambda i, t: t),
    }


def train(tmp: Path, model: Path, data_dir: Path, backend: str, name: str, method: dict, /, **sections):
    train_keys = {"iters": STEPS, "batch_size": 4, "lr": LR, "save_every": STEPS, "steps_per_eval": 100, "val_batches": 1,
                  **sections.pop("train", {})}
    p = recipe_file(tmp, model, data_dir, name=f"{name}-{backend}", method=method, train=train_keys, **sections)
    (recipe,) = load_recipes([p])
    result = Trainer(prepare(recipe), backend, quiet=True).run()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models, data_dirs):
    """(model name, run kind) -> {backend: (StageResult, training losses)}, trained on first use from one
    recipe. Run kinds: lora, dora, qlora (4-bit base), long-on / long-off (long data, packed or padded)."""
    cache: dict[tuple[str, str], dict] = {}

    def get(name: str, kind: str) -> dict:
        if (name, kind) not in cache:
            tmp = tmp_path_factory.mktemp(f"{name}-{kind}")
            model = models(name)
            sections: dict = {"data": {"max_seq_length": 128}}
            method = {"kind": "dora" if kind == "dora" else "lora"}
            if kind == "qlora":
                sections.update(model={"quantize": "4bit"}, mlx={"quantize_group_size": 32}, train={"iters": 4, "save_every": 4})
            if kind.startswith("long"):
                sections["data"] = {"max_seq_length": 256, "packing": kind.removeprefix("long-")}
            rows = data_dirs["long" if kind.startswith("long") else "short"]
            cache[name, kind] = {b: train(tmp, model, rows, b, kind, method, **sections) for b in BACKENDS}
        return cache[name, kind]

    return get


# ---------------------------------------------------------------- logits


def token_ids(model: Path, text: str = TEXT) -> list[int]:
    return load_tokenizer(model)(text).input_ids


def loaded(backend: str, model: Path, adapter: Path | None, **model_keys):
    recipe = build_recipe({"model": {"path": str(model), **model_keys}, "data": {"path": "-"}, "torch": {"precision": "fp32"},
                           "mlx": {"quantize_group_size": 32}}, "t", check_paths=False)
    return load_for_inference(recipe, backend, adapter, model, load_tokenizer(model))


def logits_of(be, ids: list[int]) -> np.ndarray:
    """One logit row per input token, through the backend's own inference path."""
    if be.name == "torch":
        with torch.no_grad():
            return be.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    return np.array(be.tuned(mx.array([ids]))[0].astype(mx.float32))


def logits_on(backend: str, model: Path, adapter: Path | None, ids: list[int]) -> np.ndarray:
    return logits_of(loaded(backend, model, adapter), ids)


def base_logits(model: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    return plain_logits(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), ids)


def plain_logits(model, ids: list[int]) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def peft_logits(model: Path, adapter: Path, ids: list[int]) -> np.ndarray:
    """Plain transformers + PEFT, no ftkit code in the path; it must load every tensor of the file and
    expect no other (PEFT's own state dict, the names it would save, is the file's)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), str(adapter))
    assert not [str(w.message) for w in seen if "missing adapter keys" in str(w.message)]
    state = get_peft_model_state_dict(peft)
    file = read_safetensors(adapter / "adapter_model.safetensors")
    assert sorted(state) == sorted(file), (sorted(set(state) ^ set(file)))[:6]
    assert all(np.array_equal(state[k].float().numpy(), file[k]) for k in file)
    return plain_logits(peft, ids)


def cross_backend(name: str, column: str, model: Path, adapters: dict[str, Path], ids: list[int]) -> None:
    """(b) each adapter gives the same logits on both backends, (c) and in plain PEFT; the adapter moves
    the output well past the tolerance, so agreement means something."""
    base = base_logits(model, ids)
    worst_backend = worst_peft = 0.0
    for source, adapter in adapters.items():
        on = {b: logits_on(b, model, adapter, ids) for b in BACKENDS}
        assert np.abs(on[source] - base).max() > 1e-2, (name, source)
        worst_backend = max(worst_backend, float(np.abs(on["mlx"] - on["torch"]).max()))
        worst_peft = max(worst_peft, float(np.abs(peft_logits(model, adapter, ids) - on["mlx"]).max()))
    record(name, f"{column} logits", worst_backend)
    assert worst_backend <= LOGITS_ATOL, (name, worst_backend)
    record(name, f"{column} peft", worst_peft)
    assert worst_peft <= LOGITS_ATOL, (name, worst_peft)


def same_losses_and_tensors(name: str, column: str, trained: dict) -> None:
    """(a) the same losses step by step and the same adapter, on both backends."""
    (res_t, loss_t), (res_m, loss_m) = trained["torch"], trained["mlx"]
    assert (res_t.backend, res_m.backend) == BACKENDS
    assert len(loss_t) == len(loss_m) == STEPS
    rel = float((np.abs(np.array(loss_t) - np.array(loss_m)) / np.array(loss_t)).max())
    record(name, f"{column} loss", rel)
    a = read_safetensors(res_t.adapter / "adapter_model.safetensors")
    b = read_safetensors(res_m.adapter / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    tensors = record(name, f"{column} tensors", max(float(np.abs(a[k] - b[k]).max()) for k in a))
    assert rel < LOSS_RTOL, (name, rel, loss_t, loss_m)
    assert loss_t[-1] < loss_t[0]  # it trained: two flat lines would agree for nothing
    assert res_t.info["trainable_params"] == res_m.info["trainable_params"]
    # Adam's first steps move each entry by about lr whatever the gradient's size, so where a gradient is
    # near its eps (lora_A while B is still small) float noise moves an entry by a fraction of lr
    assert tensors < LR, (name, tensors)
    cfg_t, cfg_m = (json.loads((r.adapter / "adapter_config.json").read_text()) for r in (res_t, res_m))
    for key in ("peft_type", "r", "lora_alpha", "use_dora", "layers_to_transform"):
        assert cfg_t.get(key) == cfg_m.get(key), (name, key)
    # no expert targeted: PEFT writes [] on a MoE model (None on a dense one), ftkit's MLX writer None
    assert (cfg_t.get("target_parameters") or None) == (cfg_m.get("target_parameters") or None), name
    assert sorted(cfg_t["target_modules"]) == sorted(cfg_m["target_modules"])


# ---------------------------------------------------------------- LoRA on every family (a, b, c)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_losses_and_adapters_agree(runs, family):
    same_losses_and_tensors(family, "lora", runs(family, "lora"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_adapters_give_the_same_logits_on_both_backends_and_in_peft(runs, models, family):
    model = models(family)
    ids = token_ids(model)
    assert len(ids) > 32  # past the sliding windows
    cross_backend(family, "lora", model, {b: res.adapter for b, (res, _) in runs(family, "lora").items()}, ids)


# ---------------------------------------------------------------- DoRA on every family (a, b, c)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dora_losses_and_adapters_agree(runs, family):
    same_losses_and_tensors(family, "dora", runs(family, "dora"))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dora_adapters_give_the_same_logits_on_both_backends_and_in_peft(runs, models, family):
    model = models(family)
    cross_backend(family, "dora", model, {b: res.adapter for b, (res, _) in runs(family, "dora").items()}, token_ids(model))


# ---------------------------------------------------------------- fuse (d)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fused_folders_from_both_backends_load_whole_with_the_adapters_logits(runs, models, tmp_path, family, kind):
    """The MLX-trained adapter (the one that crossed the layout conversion) fused by each backend."""
    from transformers import AutoModelForCausalLM

    from ftkit.ops.fuse import fuse

    model = models(family)
    adapter = runs(family, kind)["mlx"][0].adapter
    ids = token_ids(model)
    want = logits_on("mlx", model, adapter, ids)
    worst, folders = 0.0, {}
    for backend in BACKENDS:
        folders[backend] = out = tmp_path / backend
        fuse(adapter, out, model=None, backend_name=backend, dequantize=False, force=False)
        fused, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), (family, backend, info)
        worst = max(worst, float(np.abs(plain_logits(fused, ids) - want).max()))
    record(family, f"{kind} fuse", worst)
    assert worst <= LOGITS_ATOL, (family, worst)
    a, b = (read_safetensors(folders[k] / "model.safetensors") for k in BACKENDS)
    assert sorted(a) == sorted(b)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5


# ---------------------------------------------------------------- QLoRA (e)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_qlora_trains_on_both_backends_and_its_adapter_loads_everywhere(runs, models, family):
    pytest.importorskip("bitsandbytes")
    trained = runs(family, "qlora")
    assert trained["torch"][0].info["quantization"].startswith("nf4")  # "4bit" is nf4 on torch
    assert trained["mlx"][0].info["quantization"] == "4-bit, group size 32"
    model = models(family)
    ids = token_ids(model)
    for backend, (res, losses) in trained.items():
        record(family, f"qlora {backend} loss", losses[-1] - losses[0], "{:+.3f}")
        assert len(losses) == 4 and np.isfinite(losses).all(), (family, backend, losses)
        assert losses[-1] < losses[0], (family, backend, losses)
        assert (res.adapter / "adapter_model.safetensors").exists()
        # on its own quantized base, through the backend's inference path; the base really is quantized
        # there (a random model's loss sits near ln(vocab) either way, so the logits tell, not the loss)
        quantized = logits_of(loaded(backend, model, res.adapter, quantize="4bit"), ids)
        assert np.isfinite(quantized).all(), (family, backend)
        shift = record(family, f"qlora {backend} 4bit shift", float(np.abs(quantized - logits_on(backend, model, res.adapter, ids)).max()))
        assert shift > 1e-2, (family, backend, shift)
    # an adapter trained on a quantized base is still an adapter of the float base: the same logits on
    # both backends and in PEFT there
    cross_backend(family, "qlora", model, {b: res.adapter for b, (res, _) in trained.items()}, ids)


# ---------------------------------------------------------------- long sequences: windows and LongRoPE


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["on", "off"])
@pytest.mark.parametrize("name", TWINS)
def test_long_sequences_past_windows_and_original_context(runs, models, data_dirs, name, packing):
    model = models(name)
    config = json.loads((model / "config.json").read_text())
    limit = config.get("original_max_position_embeddings") or config["sliding_window"]
    lengths = [len(token_ids(model, json.loads(line)["text"])) for line in (data_dirs["long"] / "train.jsonl").read_text().splitlines()]
    assert min(lengths) > limit  # every example runs past the window / the original context
    text = json.loads((data_dirs["long"] / "test.jsonl").read_text().splitlines()[0])["text"]
    ids = token_ids(model, text)
    assert len(ids) > limit
    # the window / LongRoPE changes these logits, so the backends' agreement below means something
    assert np.abs(base_logits(model, ids) - base_logits(models(TWINS[name]), ids)).max() > 1e-2, name
    kind = f"long-{packing}"
    same_losses_and_tensors(name, kind, runs(name, kind))
    cross_backend(name, kind, model, {b: res.adapter for b, (res, _) in runs(name, kind).items()}, ids)
