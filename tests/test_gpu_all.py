"""bench/gpu_all.sh, the one-command GPU run: its CPU dry run end to end (parts, table, exit status, time
budgets, installing wheels only when a package is missing), and a GPU-marked check of its own for `pytest -m gpu`.

The dry run's parts are a subset (speed.py --smoke alone costs two child processes; test_bench_speed runs it):
the speed part's rows are checked from speed.py's own `summarize` instead.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def gpu_all_module():
    spec = importlib.util.spec_from_file_location("gpu_all", BENCH / "gpu_all.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_all"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def dry_run(tmp_path: Path, *args: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHON": sys.executable, "FTKIT_WHEELS": ""}
    proc = subprocess.run(["bash", str(BENCH / "gpu_all.sh"), "--dry-run", "--work", str(tmp_path / "work"), "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def table_of(stdout: str) -> list[str]:
    """The lines from the table's header to the end: the table must be the last thing printed."""
    lines = stdout.rstrip().splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("part ") and "result" in line)
    return lines[head:]


def make_wheel(folder: Path, module: str, dist: str, version: str = "0.1") -> Path:
    """A minimal pure-Python wheel holding `module` (VALUE = 7)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{dist.replace('-', '_')}-{version}.dist-info"
    files = {f"{module}/__init__.py": "VALUE = 7\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test_gpu_all\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    digest = lambda text: base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()  # noqa: E731
    record = "".join(f"{name},sha256={digest(text)},{len(text.encode())}\n" for name, text in files.items()) + f"{info}/RECORD,,\n"
    path = folder / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in {**files, f"{info}/RECORD": record}.items():
            z.writestr(name, text)
    return path


def test_dry_run_passes_and_ends_with_one_table(tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    proc, report = dry_run(tmp_path, "--only", "tests,gpu_check,fsdp", "--wheels", str(empty))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert report["ok"] and report["dry_run"]
    rows = {r["part"]: r for r in report["rows"]}
    assert list(rows) == ["setup", "tests", "gpu_check", "fsdp"]  # setup always; speed not asked for
    assert all(r["status"] == "pass" for r in rows.values())
    assert all(r["seconds"] is not None and 0 <= r["seconds"] < 300 for r in rows.values())
    # the GPU tests were found (this file has one) and skipped without CUDA
    assert "0 passed, 0 failed" in rows["tests"]["notes"][0] and " 0 skipped" not in rows["tests"]["notes"][0]
    for part in ("gpu_check", "fsdp"):
        r = rows[part]
        assert r["tokens_per_s"] > 0 and r["mfu"] is None and r["peak_gib"] is None  # CPU: no peak FLOP/s, no CUDA memory
        assert "ran unpaged as adamw_8bit: no CUDA" in r["notes"]
    # the FSDP smoke ran on gloo through `ftkit launch`, on the model the gpu_check part built, and says what one process means
    assert rows["fsdp"]["notes"][0] == "1 process(es): fsdp asked, 1 process: not wrapped"
    assert rows["fsdp"]["ratio"].endswith("x tok/s (fsdp/single)")
    assert (Path(report["work"]) / "fsdp" / "run-fsdp" / "metrics.jsonl").exists()
    assert not (Path(report["work"]) / "fsdp" / "model").exists()
    table = table_of(proc.stdout)
    assert [line.split()[0] for line in table[2:-1]] == ["setup", "tests", "gpu_check", "fsdp"]
    assert [line.split()[1] for line in table[2:-1]] == ["pass"] * 4
    assert table[-1].startswith("all parts passed")


def test_a_failed_part_fails_the_run_and_the_rest_still_runs(tmp_path):
    """Setup installs a missing package from its wheel (only that one), fails on one that has no wheel; the
    FSDP part then runs out of its 1 s budget and is killed; the run goes on, prints the table, exits 1."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "probe_gpu_all", "probe-gpu-all")
    make_wheel(wheels, "json", "json-not-needed")  # a present module: its wheel must not be installed
    proc, report = dry_run(tmp_path, "--only", "fsdp", "--budget", "fsdp=1", "--wheels", str(wheels),
                           "--require", "probe_gpu_all=probe-gpu-all", "--require", "json=json-not-needed",
                           "--require", "ftkit_no_such_module", timeout=120)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert not report["ok"]
    setup, fsdp = report["rows"]
    assert setup["status"] == "fail"
    assert setup["notes"][0].startswith(f"ftkit_no_such_module missing, no wheel in {wheels}")
    assert "installed probe_gpu_all-0.1" in setup["notes"], setup["notes"]
    site = Path(report["work"]) / "site"
    assert (site / "probe_gpu_all" / "__init__.py").exists() and not (site / "json").exists()
    assert fsdp["part"] == "fsdp" and fsdp["status"] == "timeout"
    assert fsdp["seconds"] < 15  # killed at its budget, not left to finish (~10 s here on a quiet machine)
    assert "killed after" in " ".join(fsdp["notes"])
    table = table_of(proc.stdout)
    assert [line.split()[:2] for line in table[2:-1]] == [["setup", "fail"], ["fsdp", "timeout"]]
    assert table[-1].startswith("FAILED: setup, fsdp")
    assert "--- fsdp (timeout), end of" in proc.stdout  # its log's end, before the table


def test_a_second_run_finds_what_the_first_installed(tmp_path):
    gpu_all = gpu_all_module()
    wheels, site = tmp_path / "wheels", tmp_path / "work" / "site"
    make_wheel(wheels, "probe_gpu_all_two", "probe-gpu-all-two")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    need = [gpu_all.Need("probe_gpu_all_two", "probe-gpu-all-two")]
    (tmp_path / "work" / "logs").mkdir(parents=True)
    try:
        first = gpu_all.setup(need, [wheels], site, env, 60, 1e12)
        again = gpu_all.setup(need, [wheels], site, env, 60, 1e12)
    finally:
        sys.path[:] = [p for p in sys.path if p != str(site)]
    assert first.status == "pass" and first.notes == ["installed probe_gpu_all_two-0.1"]
    assert again.status == "pass" and again.notes == ["nothing to install"]
    assert gpu_all.lacking(gpu_all.Need("json", "json", min_version="99")) is None  # no metadata: left alone
    old = gpu_all.Need("pytest", "pytest", min_version="99.0")
    assert gpu_all.lacking(old) == f"{pytest.__version__} < 99.0"
    assert gpu_all.find_wheel("probe-gpu-all-two", [tmp_path / "nowhere", wheels]).name == "probe_gpu_all_two-0.1-py3-none-any.whl"
    assert gpu_all.find_wheel("probe-gpu-all", [wheels]) is None  # a name's prefix is not the name


def test_speed_rows_come_from_speed_py_s_own_table():
    sys.path.insert(0, str(BENCH))
    import speed

    gpu_all = gpu_all_module()
    base = {"train_s": 1.0, "wall_s": 9.0, "peak_rss_mib": 500.0, "final_loss": 2.0}
    runs = [{"pair": "torch", "data": "wikisql", "tool": "ftkit torch", "tokens_per_s": 2000.0, "peak_gpu_memory_gib": 2.0,
             "flops_per_s": 4e14, "peak_fraction": 0.5, **base},
            {"pair": "torch", "data": "wikisql", "tool": "Trainer+PEFT", "tokens_per_s": 1000.0, "peak_gpu_memory_gib": 4.0,
             "flops_per_s": 2e14, "peak_fraction": 0.25, **base},
            {"pair": "torch", "data": "packed", "tool": "ftkit torch", "tokens_per_s": 3000.0, "peak_gpu_memory_gib": None, **base},
            {"pair": "torch", "data": "packed", "tool": "Trainer+PEFT", "error": "exit 1: CUDA out of memory"}]
    report = {"table": speed.summarize(runs, [("torch", "wikisql"), ("torch", "packed")], {"torch": 8e14}), "runs": runs}
    first = gpu_all.Row("speed", seconds=42.0)
    wikisql, packed = gpu_all.speed_rows(report, 1, first)
    assert wikisql is first and (wikisql.part, wikisql.status, wikisql.seconds) == ("speed wikisql", "pass", 42.0)
    assert (wikisql.tokens_per_s, wikisql.mfu, wikisql.peak_gib) == (2000.0, 0.5, 2.0)
    assert wikisql.ratio == "2.00x tok/s, 0.50x mem (ftkit/Trainer)"
    assert wikisql.notes == ["Trainer+PEFT 1,000 tok/s, 25.0% of GEMM peak, 4.00 GiB", "MFU here: of the 800 TFLOP/s GEMM peak speed.py measured"]
    assert (packed.part, packed.status, packed.seconds, packed.ratio) == ("speed packed", "fail", None, "n/a")
    assert packed.mfu is None and packed.notes == ["Trainer+PEFT failed", "MFU here: of the 800 TFLOP/s GEMM peak speed.py measured"]
    lines = gpu_all.fmt_table([wikisql, packed]).splitlines()
    assert lines[2].split()[:4] == ["speed", "wikisql", "pass", "42"] and lines[3].split()[:5] == ["speed", "packed", "fail", "-", "3,000"]
    # every figure there, but speed.py still exited non-zero: the part fails
    ok = {"table": speed.summarize(runs[:2], [("torch", "wikisql")], {"torch": 8e14}), "runs": runs[:2]}
    assert [r.status for r in gpu_all.speed_rows(ok, 0, gpu_all.Row("speed"))] == ["pass"]
    assert [r.status for r in gpu_all.speed_rows(ok, 1, gpu_all.Row("speed"))] == ["fail"]


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("quantize", "optimizer"), [("none", "adamw"), ("nf4", "paged_adamw_8bit")])
def test_tiny_lora_trains_on_cuda_in_bf16(tmp_path, tiny_model_dir, small_data, quantize, optimizer):
    """On CUDA: bf16 autocast, the peak memory in every train record, and the paged optimizer run as asked."""
    from builders import recipe_file

    from ftkit.recipe.load import load_recipes
    from ftkit.train.loop import Trainer
    from ftkit.train.prepare import prepare

    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, model={"quantize": quantize},
                         train={"iters": 4, "optimizer": optimizer}, torch={"precision": "bf16"})
    (r,) = load_recipes([recipe])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(prepare(r), "torch", quiet=True).run()
    assert not [w for w in caught if "the same update, unpaged" in str(w.message)]
    recs = [json.loads(line) for line in (tmp_path / "run-r" / "metrics.jsonl").read_text().splitlines()]
    run = next(x for x in recs if x["kind"] == "run")
    assert str(run["device"]).startswith("cuda") and run["precision"] == "bf16"
    train = [x for x in recs if x["kind"] == "train"]
    assert len(train) == 4 and all(math.isfinite(x["loss"]) and x["peak_memory_gib"] > 0 for x in train)
    assert (tmp_path / "run-r" / "adapter" / "adapter_model.safetensors").exists()
