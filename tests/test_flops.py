"""FLOP accounting (ftkit.models.flops, ftkit.train.flops) and the peak MFU is measured against
(ftkit.backend.peak): the formula against torch's FlopCounterMode on tiny models, packed attention, the
shapes of every family's config, golden counts for two real configs, the probe's cache, and MFU in a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import recipe_file
from families import BASE, FAMILIES, MOE_FAMILIES, build_family

from ftkit.backend import peak as peaks
from ftkit.data.batch import Batch, Example, make_batch
from ftkit.data.packing import packed_micro_batches
from ftkit.models.flops import Architecture
from ftkit.train.flops import FlopModel, Meter, Method, example_lengths, probe_tokens

TINYLLAMA = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
             "intermediate_size": 5632, "vocab_size": 32000}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2}


# ---------------------------------------------------------------- against FlopCounterMode


def _counted(model_dir: Path, method: dict, batch: Batch) -> tuple[int, object]:
    """FLOPs torch counts in one forward_backward of the torch backend (eager attention: plain bmm's it sees;
    transformers' MoE experts run as aten._grouped_mm, which FlopCounterMode has no formula for: given here)."""
    pytest.importorskip("peft")
    import torch
    from ftkit_torch.backend import TorchBackend
    from torch.utils.flop_counter import FlopCounterMode

    from ftkit.recipe.load import build_recipe

    recipe = build_recipe({"model": {"path": str(model_dir)}, "data": {"path": "-"}, "method": {"rank": 4, "alpha": 8, "dropout": 0.0, **method},
                           "torch": {"precision": "fp32", "attn_implementation": "eager"}}, "t", check_paths=False)
    be = TorchBackend()
    be.load(recipe, model_dir, adapter=None, train=True)
    be.start_training()
    grouped = {torch.ops.aten._grouped_mm: lambda a, b, *args, out_shape=None, **kw: 2 * int(np.prod(a)) * out_shape[-1]}
    with FlopCounterMode(display=False, custom_mapping=grouped) as counter:
        be.forward_backward(batch, 1.0)
    return counter.get_total_flops(), recipe


def _rows(rows: int = 2, length: int = 24, prompt: int = 10) -> Batch:
    """Rows of one example each, no padding (a dense kernel then computes exactly the example's pairs), loss after `prompt`."""
    ids = np.random.default_rng(0).integers(0, 500, size=(rows, length + 1)).astype(np.int32)
    mask = np.ones((rows, length), np.float32)
    mask[:, :prompt] = 0
    return Batch(ids[:, :-1], ids[:, 1:], mask, np.ones((rows, length), np.int32))


def _extra_head(arch: Architecture, batch: Batch, virtual: int) -> float:
    """torch's prompt and prefix tuning run the head at every position (virtual ones too), not only at the
    loss's: forward and input gradient there, which the model FLOPs leave out."""
    rows, length = batch.inputs.shape
    return 2 * 2 * arch.head_macs * (rows * (length + virtual) - batch.n_targets)


@pytest.mark.parametrize("kind", ["lora", "dora", "full", "prompt", "prefix"])
def test_formula_is_what_torch_counts(tiny_model_dir, kind):
    """Exact, not approximate: FlopCounterMode counts the matrix products torch runs, and the formula counts
    matrix products only. Where they differ, torch does work the model does not need, and the test names it:
    PEFT's DoRA forms B @ A by pushing an identity matrix through A (2 r in^2 more per adapted layer and
    forward), and torch's prompt/prefix tuning run the head at every position. The attention term is counted
    non-causal here because eager attention computes the whole square (`causal=False`)."""
    batch = _rows()
    counted, recipe = _counted(tiny_model_dir, {"kind": kind}, batch)
    arch = Architecture.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    model = FlopModel(arch, Method.of(recipe.method))
    ours = model.examples(example_lengths(batch), batch.n_targets, micro_batches=1, causal=False)
    if kind == "dora":
        ours += sum(2 * 4 * lin.fan_in**2 for block in arch.blocks for lin in block.linears)
    if kind in ("prompt", "prefix"):
        ours += _extra_head(arch, batch, recipe.method.num_virtual_tokens if kind == "prompt" else 0)
    assert ours == counted
    if kind == "full":  # 6N per token, plus attention and the head at the targets
        n = sum(lin.macs for block in arch.blocks for lin in block.linears)
        assert model.per_token() == 6 * n


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer_dir):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(name), tokenizer_dir)
        return built[name]

    return get


@pytest.mark.parametrize("family,method", [
    ("qwen2_moe", {"kind": "lora"}),  # router, 2 of 4 experts, a gated shared expert; GQA
    ("qwen2_moe", {"kind": "full"}),
    ("cohere", {"kind": "lora", "targets": ["q_proj", "v_proj"]}),  # parallel block: the MLP branch needs no gradient in block 0
    ("phi3", {"kind": "lora", "targets": ["o_proj"], "layers": 1}),  # fused projections; only the last block adapted
])
def test_formula_on_family_shapes(family_dirs, family, method):
    folder = family_dirs(family)
    batch = _rows()
    counted, recipe = _counted(folder, method, batch)
    model = FlopModel(Architecture.from_config(json.loads((folder / "config.json").read_text())), Method.of(recipe.method))
    assert model.examples(example_lengths(batch), batch.n_targets, micro_batches=1, causal=False) == counted


# ---------------------------------------------------------------- shapes and golden counts


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_config_gives_its_weights(family):
    """The matrices read from each family's config are the model's own: their sizes sum to its matrix
    parameters (every expert and the router included; the head once, tied or not)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=512, pad_token_id=3, eos_token_id=2, bos_token_id=None, **{**BASE, **FAMILIES[family]})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    held = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() >= 2) + 512 * 64
    arch = Architecture.from_config(config.to_dict())
    assert arch.parameters() == held
    assert (arch.heads, arch.kv_heads, arch.head_dim) == (4, 2, 16)
    if family in MOE_FAMILIES:  # a token passes through top_k experts, not all of them
        experts = [lin for lin in arch.blocks[0].linears if lin.copies > 1]
        assert experts and all(lin.active == 2 and lin.copies == 4 for lin in experts)


@pytest.mark.parametrize("targets,layers", [("all-linear", None), (["all-linear", "experts"], None), (["q_proj", "experts.down_proj"], 1),
                                            (["down_proj", "shared_expert_gate"], None)])
def test_adapted_layers_are_the_ones_select_picks(targets, layers):
    """The FLOP count's adapted layers follow ftkit.adapters.targets.select on the same module paths."""
    from ftkit.adapters.targets import select
    from ftkit.recipe.schema import MethodSection
    from ftkit.train.flops import _adapted

    arch = Architecture.from_config({**BASE, **FAMILIES["qwen2_moe"], "model_type": "qwen2_moe", "vocab_size": 512})
    paths = [f"model.layers.{b}.{lin.name}" for b, block in enumerate(arch.blocks) for lin in block.linears]
    method = MethodSection(kind="lora", targets=targets, layers=layers, dropout=0.0)
    ours = [p for p in paths if _adapted(p, int(p.split(".")[2]), len(arch.blocks), Method.of(method))]
    assert ours == sorted(select(paths, method, len(arch.blocks)), key=paths.index)


def test_golden_counts_of_real_configs():
    """TinyLlama-1.1B (GQA 32/4) and Mixtral-8x7B (2 of 8 experts): FLOPs per token by hand."""
    tiny = Architecture.from_config(TINYLLAMA)
    block = 2048 * 2048 * 2 + 2048 * 256 * 2 + 3 * 2048 * 5632  # q, o; k, v (4 kv heads of 64); gate, up, down
    assert tiny.parameters() == 22 * block + 2048 * 32000 == 1_034_420_224
    assert FlopModel(tiny, Method("full")).per_token() == 6 * 22 * block
    lora = FlopModel(tiny, Method("lora", rank=16))
    # forward 2N; input gradients 2N but for block 0's q, k, v (its input carries no gradient); the adapter
    # (r (in + out) per layer): forward, both weight gradients, input gradient through B, and through A but in block 0's q, k, v
    adapter = 16 * (4096 + 2304 + 2304 + 4096 + 3 * 7680)
    readers = 2048 * (2048 + 256 + 256)
    assert lora.per_token() == 2 * (2 * 22 * block - readers + 3 * 22 * adapter - 16 * 2048 * 3)
    assert lora.per_token() == 3_940_548_608
    assert lora.target == 2 * 2048 * 32000  # the head: forward and input gradient, no weight gradient
    mixtral = Architecture.from_config(MIXTRAL)
    attn = 4096 * 4096 * 2 + 4096 * 1024 * 2
    assert mixtral.parameters() == 32 * (attn + 4096 * 8 + 8 * 3 * 4096 * 14336) + 4096 * 32000  # 46.6B held
    assert FlopModel(mixtral, Method("full")).per_token() == 6 * 32 * (attn + 4096 * 8 + 2 * 3 * 4096 * 14336)  # 12.6B active


def test_attention_is_counted_per_packed_example():
    """A packed row's examples attend only inside themselves: pairs per example, not per row, and no padding;
    packed or padded, the same examples are the same model FLOPs."""
    arch = Architecture.from_config(TINYLLAMA)
    lengths = np.array([3, 5])
    assert arch.attention_pairs(lengths, None) == 6 + 15  # causal: query i sees i keys
    assert arch.attention_pairs(lengths, 4) == 6 + (1 + 2 + 3 + 4 + 4)  # a sliding window of 4
    assert arch.attention_pairs(lengths, None, prefix=2) == 21 + 8 * 2  # prefix tuning's virtual keys
    assert arch.attention_pairs(lengths, None, causal=False) == 9 + 25
    examples = [Example(ids=list(range(1, n + 2)), mask=[0] + [1] * n) for n in (3, 5, 7, 2)]
    packed = packed_micro_batches(examples, 1, 0)
    assert any(b.positions is not None for b in packed)
    assert sorted(np.concatenate([example_lengths(b) for b in packed]).tolist()) == [2, 3, 5, 7]
    padded = make_batch(examples, 0)
    assert example_lengths(padded).tolist() == [3, 5, 7, 2]
    model = FlopModel(arch, Method("lora"))
    per_example = model.examples([3, 5, 7, 2], 17)  # one micro-batch count aside, FLOPs depend on the examples only
    assert sum(model.batch(b) for b in packed) == pytest.approx(per_example)
    assert model.batch(padded) == pytest.approx(per_example)
    row_quadratic = FlopModel(arch, Method("lora")).examples([17], 17)  # the four as one 17-token example
    assert row_quadratic > per_example


def test_sliding_windows_come_from_the_config():
    gemma2 = Architecture.from_config({**BASE, **FAMILIES["gemma2"], "model_type": "gemma2", "vocab_size": 512,
                                       "layer_types": ["sliding_attention", "full_attention"]})
    assert [b.window for b in gemma2.blocks] == [32, None]
    mistral = Architecture.from_config({**TINYLLAMA, "model_type": "mistral", "sliding_window": 4096})
    assert {b.window for b in mistral.blocks} == {4096}
    qwen2 = Architecture.from_config({**TINYLLAMA, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
    assert {b.window for b in qwen2.blocks} == {None}


# ---------------------------------------------------------------- the meter and the peak


def test_meter_reports_flops_per_second_and_mfu():
    from ftkit.data.batching import Share

    model = FlopModel(Architecture.from_config(TINYLLAMA), Method("lora"))
    batch = _rows()
    share = Share([batch], 1, batch.n_targets, batch.n_tokens)
    meter = Meter(model, peaks.Peak(1e12, "float32", "probe", "test"), processes=2)
    meter.add(share)
    sent = []
    out = meter.report(batch.n_tokens, 2.0, lambda values: sent.append(values) or [v * 2 for v in values])
    assert sent == [[model.batch(batch)]]  # summed over the processes
    assert out["flops_per_sec"] == pytest.approx(2 * model.batch(batch) / 2.0)
    assert out["mfu"] == pytest.approx(out["flops_per_sec"] / 2e12)  # of two devices' peak
    meter.add(share)  # a run resumed inside a window: the steps before the checkpoint at this window's rate per token
    assert meter.report(3 * batch.n_tokens, 1.0, lambda v: v)["flops_per_sec"] == pytest.approx(3 * model.batch(batch))
    assert Meter(None, note="no config").report(10, 1.0, lambda v: v) == {}
    assert probe_tokens([100] * 9, 4) == 512 and probe_tokens([5], 1) == 128 and probe_tokens([4000], 8) == 8192


@pytest.mark.parametrize("device,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4), ("NVIDIA H100 PCIe", "bfloat16", 756.5), ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0), ("NVIDIA L4", "bfloat16", 121.0), ("NVIDIA L40S", "float16", 362.05),
    ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2), ("NVIDIA H100 80GB HBM3", "float32", 66.9),
    ("Apple M2 Max GPU", "float32", 13.6), ("Apple M2 GPU", "float16", 3.6), ("Apple M1 Ultra GPU", "float32", 21.2),
    ("NVIDIA B300", "bfloat16", None), ("AMD EPYC 7B13 CPU", "float32", None), ("Apple M4 Pro GPU", "float32", None),
])
def test_datasheet_table(device, dtype, tflops):
    found = peaks.from_table(device, dtype)
    assert (found.flops if found else None) == (tflops * 1e12 if tflops else None)
    if found:
        assert found.source == "datasheet" and dtype in found.detail


def test_peak_comes_from_the_table_else_a_cached_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("FTKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("FTKIT_PEAK_FLOPS", raising=False)
    monkeypatch.setattr(peaks, "_load_average", lambda: 0.5)  # a quiet machine: the figure is cached

    class Probe:
        name, calls = "torch", []

        def gemm_flops(self, shapes, dtype, seconds):
            self.calls.append((shapes, dtype))
            return 5e10

    probe, shapes = Probe(), [(128, 64, 64), (128, 64, 128)]
    gpu = {"device": "cuda:0 (NVIDIA H100 80GB HBM3)", "precision": "bf16", "dtype": "float32", "torch": "2"}
    assert peaks.for_run(probe, gpu, "AMD EPYC", shapes).flops == 989.4e12 and not probe.calls
    cpu = {"device": "cpu", "precision": "fp32", "dtype": "float32", "torch": "2"}
    first = peaks.for_run(probe, cpu, "AMD EPYC", shapes)
    again = peaks.for_run(probe, cpu, "AMD EPYC", shapes)  # measured once, then read from the cache
    assert first == again and first.flops == 5e10 and first.source == "probe" and "128x64x128" in first.detail
    # each shape from 64 rows, doubled up to the model's: both sizes reached within the budget
    assert probe.calls == [([(64, 64, 64)], "float32"), ([(128, 64, 64)], "float32"), ([(64, 64, 128)], "float32"), ([(128, 64, 128)], "float32")]
    peaks.for_run(probe, {**cpu, "precision": "bf16"}, "AMD EPYC", shapes)  # another dtype is another probe
    assert [c[1] for c in probe.calls] == ["float32"] * 4 + ["bfloat16"] * 4
    assert len(json.loads((tmp_path / peaks.CACHE_FILE).read_text())) == 2

    clock = [0.0]

    class Slow(Probe):  # a slow device on a fake clock: 0.2 s per 64 rows
        def gemm_flops(self, shapes, dtype, seconds):
            clock[0] += 0.2 * shapes[0][0] / 64
            return 1e9 * shapes[0][0]

    with monkeypatch.context() as m:
        m.setattr(peaks.time, "perf_counter", lambda: clock[0])
        got, reached = peaks.probe(Slow(), [(8192, 2048, 5632)], "float32", 1.0)
    assert reached == [(128, 2048, 5632)] and got == 128e9  # 256 rows would have ended past the budget
    monkeypatch.setattr(peaks, "_load_average", lambda: 1000.0)  # a busy one: measured, used, not cached
    busy = peaks.for_run(probe, {**cpu, "dtype": "float16", "precision": "fp16"}, "AMD EPYC", shapes)
    assert "not cached" in busy.detail and len(json.loads((tmp_path / peaks.CACHE_FILE).read_text())) == 2
    mlx_gpu = {"device": "mlx gpu (Metal)", "dtype": "bfloat16", "precision": "bfloat16"}
    assert peaks.for_run(probe, mlx_gpu, "Apple M1 Max", shapes).flops == 10.4e12
    monkeypatch.setenv("FTKIT_PEAK_FLOPS", "123e9")
    assert peaks.for_run(probe, cpu, "AMD EPYC", shapes).flops == 123e9
    monkeypatch.setenv("FTKIT_PEAK_FLOPS", "fast")
    with pytest.raises(Exception, match="FTKIT_PEAK_FLOPS"):
        peaks.for_run(probe, cpu, "AMD EPYC", shapes)


def test_backends_probe_their_gemm_rate():
    """Each backend's probe, at a tiny size and budget: a positive rate, within a few hundredths of a second."""
    pytest.importorskip("torch")
    import torch
    from ftkit_torch.gemm import best_flops

    assert best_flops([(64, 32, 32)], "float32", torch.device("cpu"), 0.02) > 0
    if all(__import__("importlib").util.find_spec(m) for m in ("mlx",)):
        from ftkit_mlx.gemm import best_flops as mlx_best

        assert mlx_best([(64, 32, 32)], "float32", 0.02) > 0


# ---------------------------------------------------------------- in a run


def test_every_train_record_has_mfu(tmp_path, tiny_model_dir, small_data, monkeypatch):
    """A short tiny run on the CPU: the GEMM probe (the suite's conftest sets FTKIT_PEAK_FLOPS; this test
    wants the probe) gives the peak in the run record, and every train record has `flops_per_sec` and `mfu`."""
    pytest.importorskip("peft")
    from ftkit.recipe.load import load_recipes
    from ftkit.train.stages import run_stages

    monkeypatch.delenv("FTKIT_PEAK_FLOPS", raising=False)
    monkeypatch.setenv("FTKIT_CACHE", str(tmp_path / "cache"))
    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 3, "save_every": 3, "steps_per_eval": 3})
    (result,) = run_stages(load_recipes([recipe]), "torch", quiet=True)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    (run,) = [r for r in rows if r["kind"] == "run"]
    assert run["peak_source"] == "probe" and run["peak_dtype"] == "float32" and "x64x128" in run["peak_detail"]
    peak = run["peak_flops_per_sec"]
    assert peak > 0 and run["flops_per_token"] > 0
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3
    for r in train:
        assert r["flops_per_sec"] > 0 and r["mfu"] == pytest.approx(r["flops_per_sec"] / peak)
        # FLOPs per token of the window: between the linear layers' alone and that plus a long example's attention
        per_token = r["flops_per_sec"] / r["tokens_per_sec"]
        assert run["flops_per_token"] < per_token < 3 * run["flops_per_token"]

