"""bf16 on CPUs: the rule `torch.precision = "auto"` follows (ftkit_torch/precision.py), checked on every branch with
the CPU's flags and the device mocked, and bench/cpu_bf16.py (the measurement behind it) run in its smoke mode."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from builders import bench_module, recipe_file  # noqa: E402
from ftkit_torch import precision  # noqa: E402

AVX512_BF16 = frozenset({"fpu", "avx512f", "avx512_bf16"})
AMX = frozenset({"fpu", "avx512f", "amx_tile", "amx_bf16"})
PLAIN_AVX512 = frozenset({"fpu", "avx512f", "avx512bw"})  # AVX-512 without bf16 instructions: bf16 is emulated


@pytest.mark.parametrize(("want", "device", "kwargs", "expected"), [
    ("auto", "cuda", {"cuda_bf16": True}, "bf16"),
    ("auto", "cuda", {"cuda_bf16": False}, "fp32"),
    ("auto", "cpu", {"flags": AVX512_BF16, "cpu_bf16_pays": False}, "fp32"),  # the measured branch: not worth it
    ("auto", "cpu", {"flags": AVX512_BF16, "cpu_bf16_pays": True}, "bf16"),  # had it measured faster and within 1%
    ("auto", "cpu", {"flags": AMX, "cpu_bf16_pays": True}, "bf16"),
    ("auto", "cpu", {"flags": AVX512_BF16, "cpu_bf16_pays": True, "train": False}, "fp32"),  # eval, generate, fuse: fp32
    ("auto", "cuda", {"cuda_bf16": True, "train": False}, "bf16"),
    ("auto", "cpu", {"flags": PLAIN_AVX512, "cpu_bf16_pays": True}, "fp32"),  # no native bf16: never
    ("auto", "cpu", {"flags": frozenset(), "cpu_bf16_pays": True}, "fp32"),  # no /proc/cpuinfo
    ("auto", "mps", {}, "fp32"),
    ("bf16", "cpu", {"flags": frozenset()}, "bf16"),  # a named precision is taken as it is, with no reason given
    ("fp32", "cuda", {"cuda_bf16": True}, "fp32"),
    ("fp16", "cuda", {"cuda_bf16": True}, "fp16"),
])
def test_auto_rule(want, device, kwargs, expected):
    choice = precision.resolve(want, device, **kwargs)
    assert choice.name == expected
    assert (choice.reason is None) == (want != "auto")
    if want == "auto":
        assert choice.reason.startswith(f"auto: {expected}")


def test_the_shipped_cpu_verdict_is_the_measured_one(monkeypatch):
    """Measured on this project's avx512_bf16 CPU (bench/cpu_bf16.py and the quickstart): bf16 trained 1.3x faster and
    the quickstart's validation loss stayed within 1% of fp32's (+0.7%), so auto = bf16 on such CPUs. Flip
    CPU_BF16_PAYS only with new figures, and say them in CPU_BF16_MEASURED."""
    monkeypatch.delenv("FTKIT_CPU_BF16", raising=False)  # conftest keeps the suite in fp32
    assert precision.CPU_BF16_PAYS is True
    choice = precision.resolve("auto", "cpu", flags=AVX512_BF16)
    assert choice == precision.Choice("bf16", "auto: bf16 on CPU with avx512_bf16, measured 1.3x fp32's speed, quickstart validation loss +0.7%")
    assert precision.resolve("auto", "cpu", flags=AMX).reason.startswith("auto: bf16 on CPU with amx_bf16,")
    assert precision.resolve("auto", "cpu", flags=PLAIN_AVX512).reason == "auto: fp32 on CPU, no bf16 instructions (avx512_bf16, amx_bf16)"


@pytest.mark.parametrize(("env", "expected"), [("0", "fp32"), ("1", "bf16")])
def test_the_environment_overrides_the_verdict(monkeypatch, env, expected):
    monkeypatch.setenv("FTKIT_CPU_BF16", env)
    assert precision.resolve("auto", "cpu", flags=AVX512_BF16).name == expected
    assert precision.resolve("auto", "cpu", flags=PLAIN_AVX512).name == "fp32"  # never emulated bf16
    assert precision.resolve("fp32", "cpu", flags=AVX512_BF16).name == "fp32"  # a recipe's choice stands


def test_a_bad_environment_value_is_a_clear_error(monkeypatch):
    from ftkit.common.errors import FtkitError

    monkeypatch.setenv("FTKIT_CPU_BF16", "yes")
    with pytest.raises(FtkitError, match="FTKIT_CPU_BF16 = 'yes'"):
        precision.resolve("auto", "cpu", flags=AVX512_BF16)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16"}  # the first CPU's line
    assert precision.cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.parametrize(("flags", "pays", "dtype"), [(AVX512_BF16, True, torch.bfloat16), (AVX512_BF16, False, torch.float32),
                                                      (PLAIN_AVX512, True, torch.float32)])
def test_the_backend_follows_the_rule_and_says_why(tmp_path, tiny_model_dir, monkeypatch, flags, pays, dtype):
    from ftkit_torch.backend import TorchBackend

    from ftkit.recipe.load import load_recipes

    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision, "CPU_BF16_PAYS", pays)
    monkeypatch.delenv("FTKIT_CPU_BF16", raising=False)
    (recipe,) = load_recipes([recipe_file(tmp_path, tiny_model_dir, tmp_path, torch={"precision": "auto", "device": "cpu"})],
                             check_paths=False)
    be = TorchBackend()
    be.load(recipe, tiny_model_dir, adapter=None, train=True)
    info = be.describe()
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    assert be.autocast_dtype == (torch.bfloat16 if name == "bf16" else None)
    assert {p.dtype for n, p in be.model.named_parameters() if "lora_" not in n} == {dtype}  # the frozen base
    assert info["precision"] == name  # bare: ftkit.backend.peak reads the compute dtype from it
    assert info["precision_choice"].startswith(f"auto: {name} on CPU")
    assert info["switches"]["precision"].startswith(name) and info["precision_choice"] in info["switches"]["precision"]


# ---------------------------------------------------------------- bench/cpu_bf16.py --smoke


@pytest.fixture
def cpu_bf16():
    yield from bench_module("cpu_bf16")


def test_bench_smoke_compares_the_two_precisions(tmp_path, tiny_model_dir, cpu_bf16, capsys):
    assert cpu_bf16.main(["--smoke", "--json", "--work", str(tmp_path / "work"), "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out.strip().splitlines()[-1])
    # the summary: per tool fp32, bf16, then bf16 against fp32
    assert [(r["tool"], r["precision"]) for r in report["table"]] == [
        (tool, p) for tool in ("ftkit torch", "Trainer+PEFT") for p in ("fp32", "bf16", "bf16 / fp32")]
    header = "| " + " | ".join(cpu_bf16.HEADERS) + " |"
    assert cpu_bf16.HEADERS == ("tool", "precision", "weights", "trained tok/s", "train s", "final loss", "valid loss",
                                "load avg before -> after")
    assert header not in out.err  # plain text unless --markdown
    # the table's header, on whichever line other output (a library's warning) leaves it
    assert any(all(h in line for h in cpu_bf16.HEADERS) for line in out.err.splitlines())
    runs = report["runs"]
    assert [(r["tool"], r["precision"]) for r in runs] == [("ftkit", "fp32"), ("ftkit", "bf16"), ("trainer", "fp32"), ("trainer", "bf16")]
    for r in runs:
        assert "error" not in r, r
        # the two precisions really differ: the frozen weights are in the precision asked for
        assert r["weights"] == {"fp32": "float32", "bf16": "bfloat16"}[r["precision"]], r
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("tokens_per_s", "train_s", "final_loss", "valid_loss"))
        assert len(r["load_before"]) == len(r["load_after"]) == 3
        assert r["tokens_per_s"] == pytest.approx(report["target_tokens"] / r["train_s"])
    assert [r["precision_reported"] for r in runs if r["tool"] == "ftkit"] == ["fp32", "bf16"]
    for ratio in (report["table"][2], report["table"][5]):
        fp32, bf16 = (r for r in runs if r["tool"] == ("ftkit" if ratio["tool"] == "ftkit torch" else "trainer"))
        assert ratio["tokens_per_s"] == pytest.approx(bf16["tokens_per_s"] / fp32["tokens_per_s"])
        assert ratio["valid_loss"] == pytest.approx(bf16["valid_loss"] / fp32["valid_loss"] - 1)
        # a random tiny model: bf16's loss is close to fp32's, and not bit-identical (it did run in bf16)
        assert 0 < abs(bf16["valid_loss"] - fp32["valid_loss"]) < 0.05 * fp32["valid_loss"]
