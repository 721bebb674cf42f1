"""bench/speed.py: the benchmark runs end to end in its smoke mode (so it cannot rot), and the pieces that
make its comparison fair do what they say: one ftkit recipe that ftkit accepts, the baselines' loss on the
same tokens as ftkit's, mlx_lm's arguments mapped from the same settings, one epoch of the same rows for
every tool, peak memory read from the process tree. No timing is asserted anywhere."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

from harness import datasets, process  # noqa: E402
from harness.settings import (  # noqa: E402
    PROFILES,
    Settings,
    baseline_config,
    ftkit_recipe,
    ftkit_sets,
)

HAS_MLX = all(importlib.util.find_spec(m) is not None for m in ("mlx", "mlx_lm"))
METRICS = ("tokens_per_s", "flops_per_s", "peak_fraction", "train_s", "wall_s", "peak_rss_mib", "final_loss")


@pytest.mark.slow
def test_smoke_run_gives_a_full_table(tmp_path, tiny_model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "report.json"
    # the suite's tiny Llama (built once per session) stands in for the smoke profile's own, which is the same shape
    cmd = [sys.executable, str(BENCH / "speed.py"), "--smoke", "--json", "--work", str(tmp_path / "work"), "--out", str(out),
           "--torch-model", str(tiny_model_dir), "--mlx-model", str(tiny_model_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    smoke = PROFILES["smoke"]
    assert report["pairs"] == (["torch", "mlx"] if HAS_MLX else ["torch"])
    tools = {"torch": ["ftkit torch", "Trainer+PEFT", "ftkit / baseline"], "mlx": ["ftkit mlx", "mlx_lm lora", "ftkit / baseline"]}
    expected = [(p, d, t) for p in report["pairs"] for d in smoke.datasets[p] for t in tools[p]]
    assert [(r["pair"], r["data"], r["tool"]) for r in report["table"]] == expected
    for row in report["table"]:
        for k in METRICS:
            assert isinstance(row[k], float) and math.isfinite(row[k]) and row[k] > 0, (row, k)
    s = smoke.settings
    assert len(report["runs"]) == len(expected) // 3 * 2 * smoke.reps
    for run in report["runs"]:
        assert "error" not in run
        assert (run["steps"], run["examples"]) == (s.steps, s.examples)
        assert run["start"] < run["end"]
        d = report["datasets"][f"{run['pair']}/{run['data']}"]
        assert run["tokens_per_s"] == pytest.approx(d["target_tokens"] / run["train_s"])
        # the data set's model FLOPs over the same seconds, as a fraction of the GEMM peak measured in the same run
        assert run["flops_per_s"] == pytest.approx(d["flops"] / run["train_s"])
        assert run["peak_fraction"] == pytest.approx(run["flops_per_s"] / max(g["flops"] for g in report["gemm_peak"][run["pair"]]))
        if run["tool"].startswith("ftkit"):  # ftkit measured its own MFU against the benchmark's peak, at every report
            assert run["own_mfu"] and all(m is not None and m > 0 for m in run["own_mfu"])
    for p in report["pairs"]:  # the GEMM peak, before the runs and after them, at the model's sizes
        assert len(report["gemm_peak"][p]) == 2 and all(g["flops"] > 0 and g["dtype"] == "float32" for g in report["gemm_peak"][p])
        assert [r["gemm_peak"] for r in report["table"] if r["pair"] == p][:2] == [max(g["flops"] for g in report["gemm_peak"][p])] * 2
    for p in report["pairs"]:  # every set is built and counted, trained on or not
        for name in datasets.FORMATS:
            d = report["datasets"][f"{p}/{name}"]
            assert d["examples"] == s.examples and 0 < d["target_tokens"] <= d["tokens"]
    # ftkit's own count of trained tokens is the reference (the reference is ftkit's pipeline)
    for run in report["runs"]:
        if run["tool"].startswith("ftkit"):
            assert run["own_target_tokens"] == report["datasets"][f"{run['pair']}/{run['data']}"]["target_tokens"]
    # what produced the figures is recorded with them
    assert report["machine"]["cores"] and report["versions"]["torch"] and report["versions"]["ftkit"]
    assert "trained tok/s" in proc.stderr and "ftkit / baseline" in proc.stderr
    assert "model FLOP/s" in proc.stderr and "of GEMM peak" in proc.stderr and "GEMM peak FLOP/s" in proc.stderr


def test_ftkit_recipe_is_what_the_settings_say(tmp_path):
    from ftkit.recipe.load import load_recipes

    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    data.mkdir()
    s = Settings(steps=6, batch_size=3, grad_accum=2, lr=1e-4, rank=4, alpha=8, dropout=0.05, max_grad_norm=None)
    path = tmp_path / "r.toml"
    path.write_text(ftkit_recipe(s, model, data, tmp_path / "run"))
    (r,) = load_recipes([path], overrides=ftkit_sets(s, ["train.seed=3"]))
    assert (r.train.iters, r.train.batch_size, r.train.grad_accum, r.train.lr) == (6, 3, 2, 1e-4)
    assert (r.train.scheduler, r.train.warmup, r.train.optimizer, r.train.weight_decay) == ("cosine", 0, "adamw", 0.0)
    assert r.train.max_grad_norm is None and r.train.seed == 3  # --set wins, and "no clipping" gets through
    assert (r.method.kind, r.method.rank, r.method.alpha, r.method.dropout, r.method.targets) == ("lora", 4, 8, 0.05, "all-linear")
    assert r.data.valid_fraction == 0 and r.train.eval_before is False
    assert r.train.save_every >= s.steps  # no checkpoint inside the timed loop
    assert s.steps % s.report_every == 0 and s.report_every == 1
    assert Settings(steps=8).report_every == 2 and Settings(steps=30).report_every == 6 and Settings(steps=7).report_every == 1
    # the GPU profile (not run here): bf16 and, with --qlora, an nf4 base, for ftkit and the baseline alike
    cuda = PROFILES["cuda"].settings.with_(quantize="nf4")
    path.write_text(ftkit_recipe(cuda, model, data, tmp_path / "run"))
    (r,) = load_recipes([path], overrides=ftkit_sets(cuda, []))
    assert (r.torch.precision, r.model.quantize, r.train.max_grad_norm) == ("bf16", "nf4", 1.0)
    cfg = baseline_config(cuda, model, data / "train.jsonl", "text", tmp_path)
    assert (cfg["precision"], cfg["quantize"], cfg["steps"] * cfg["batch_size"] * cfg["grad_accum"]) == ("bf16", "nf4", cuda.examples)


def test_trainer_baseline_trains_on_the_tokens_ftkit_trains_on(tokenizer_dir):
    """Loss on the same tokens: the baseline's labels (-100 elsewhere, shifted by the model) are ftkit's mask."""
    pytest.importorskip("peft")
    from baseline_trainer import tokenize

    from ftkit.data.encode import encode
    from ftkit.models.tokenizer import load_tokenizer
    from ftkit.recipe.schema import DataSection

    tok = load_tokenizer(tokenizer_dir)
    cases = [("chat", json.loads(line)) for line in (datasets.CHAT / "train.jsonl").read_text().splitlines()[:20]]
    cases += [("text", json.loads(line)) for line in (datasets.WIKISQL / "train.jsonl").read_text().splitlines()[:20]]
    for fmt, row in cases:
        ours = tokenize(row, tok, fmt, 4096)
        ref = encode(row, fmt, "auto", tok, DataSection(path=".", max_seq_length=4096))
        assert ours["input_ids"] == ref.ids
        assert [int(label != -100) for label in ours["labels"][1:]] == ref.mask[1:], (fmt, row)
        if fmt == "chat":
            assert 0 < sum(ref.mask) < len(ref.ids)  # the prompt is masked, the answer is not


@pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")
def test_mlx_lm_arguments_come_from_the_same_settings(tmp_path):
    from baseline_mlx import mlx_args

    s = Settings(steps=5, batch_size=3, grad_accum=2, lr=3e-4, rank=4, alpha=16, dropout=0.1, max_grad_norm=None)
    cfg = baseline_config(s, tmp_path / "m", tmp_path / "d" / "train.jsonl", "chat", tmp_path)
    a = mlx_args(cfg, tmp_path / "d", tmp_path / "adapters")
    assert (a.iters, a.batch_size, a.grad_accumulation_steps) == (10, 3, 2)  # mlx-lm's iters are micro-batches
    assert (a.fine_tune_type, a.optimizer, a.num_layers, a.mask_prompt, a.seed) == ("lora", "adamw", -1, True, 0)
    assert a.lora_parameters == {"rank": 4, "scale": 4.0, "dropout": 0.1}
    assert a.optimizer_config["adamw"] == {"weight_decay": 0.0}
    assert a.lr_schedule == {"name": "cosine_decay", "arguments": [3e-4, 5]}
    assert a.steps_per_report == s.report_every * 2 and a.steps_per_eval > a.iters and a.save_every > a.iters
    assert mlx_args({**cfg, "format": "text"}, tmp_path / "d", tmp_path / "a").mask_prompt is False
    import mlx.optimizers as optim

    from ftkit.recipe.schema import TrainSection
    from ftkit.train.schedule import lr_at, make_schedule

    sched = optim.cosine_decay(*a.lr_schedule["arguments"])
    train = TrainSection(iters=5, lr=3e-4, scheduler="cosine", warmup=0)
    ours = make_schedule(train, 30, 0)
    for step in range(1, 6):  # mlx counts optimizer updates from 0, ftkit steps from 1
        assert float(sched(step - 1)) == pytest.approx(lr_at(step, train, ours), rel=1e-5)


def test_data_sets_are_one_epoch_of_the_same_rows(tmp_path, tokenizer_dir):
    built = {name: datasets.build(name, tmp_path, tokenizer_dir, 12, 48, 1024, seed=0) for name in datasets.FORMATS}
    for name, d in built.items():
        lines = d.file.read_text().splitlines()
        assert len(lines) == d.examples == 12
        again = datasets.build(name, tmp_path / "again", tokenizer_dir, 12, 48, 1024, seed=0)
        assert again.file.read_text() == d.file.read_text() and again.target_tokens == d.target_tokens  # seeded
        assert 0 < d.target_tokens < d.tokens
        assert len(d.input_lengths) == 12 and sum(d.input_lengths) == d.tokens - 12  # what the model reads: each row but its last token
    assert built["chat"].target_tokens < built["chat"].tokens // 2  # loss on the answers only
    assert built["wikisql"].target_tokens == built["wikisql"].tokens - 12  # every token but each row's first
    assert 44 <= built["packed"].min_length <= built["packed"].max_length <= 52  # rows of ~48 tokens
    rows = (datasets.WIKISQL / "train.jsonl").read_text().splitlines()
    assert set(built["wikisql"].file.read_text().splitlines()) <= set(rows)
    with pytest.raises(SystemExit, match="max-seq-length"):
        datasets.build("wikisql", tmp_path / "short", tokenizer_dir, 12, 48, 16)


def test_peak_memory_counts_the_process_tree(tmp_path):
    code = textwrap.dedent("""
        import subprocess, sys, time
        held = b"x" * (300 * 2**20)                        # 300 MiB in the child, touched
        g = subprocess.Popen([sys.executable, "-c", "import time; b = b'x' * (200 * 2**20); time.sleep(1.0)"])
        g.wait()
        print("done")
    """)
    m = process.run([sys.executable, "-c", code], env=dict(os.environ), cwd=tmp_path, log_prefix=tmp_path / "log", timeout_s=60)
    assert m.returncode == 0 and m.stdout.strip() == "done"
    assert m.peak_rss_bytes >= 480 * 2**20  # both at once: the sampled tree, not the largest process alone
    assert m.wall_s >= 1.0
    killed = process.run([sys.executable, "-c", "import time; time.sleep(30)"], env=dict(os.environ), cwd=tmp_path,
                         log_prefix=tmp_path / "slow", timeout_s=1)
    assert killed.returncode != 0 and killed.wall_s < 20
    capped = process.run([sys.executable, "-c", "import time; b = b'x' * (400 * 2**20); time.sleep(30)"], env=dict(os.environ),
                         cwd=tmp_path, log_prefix=tmp_path / "big", timeout_s=60, max_rss_bytes=200 * 2**20)
    assert capped.over_memory_cap and capped.returncode != 0 and capped.wall_s < 20
    assert not m.over_memory_cap and not killed.over_memory_cap


def test_table_is_medians_and_ratios():
    from speed import render, summarize

    runs = [{"pair": "torch", "data": "chat", "tool": tool, "tokens_per_s": v, "flops_per_s": 1e9 * v, "peak_fraction": v / 10,
             "train_s": 10 / v, "wall_s": 20.0, "peak_rss_mib": 100.0 * v, "final_loss": 1.0}
            for tool, vals in (("ftkit torch", (3, 1, 2)), ("Trainer+PEFT", (1, 1, 4))) for v in vals]
    runs.append({"pair": "torch", "data": "chat", "tool": "Trainer+PEFT", "error": "exit 1"})
    a, b, ratio = summarize(runs, [("torch", "chat")], {"torch": 1e10})
    assert (a["tokens_per_s"], b["tokens_per_s"], b["n"]) == (2, 1, 3)  # the failed run is left out, not counted as 0
    assert ratio["tokens_per_s"] == 2 and ratio["peak_rss_mib"] == 2 and ratio["final_loss"] == 1
    assert (a["flops_per_s"], a["peak_fraction"], ratio["flops_per_s"]) == (2e9, 0.2, 2)
    assert (a["gemm_peak"], b["gemm_peak"], ratio["gemm_peak"]) == (1e10, 1e10, None)  # one peak per pair, no ratio of it
    text, md = render([a, b, ratio], markdown=False), render([a, b, ratio], markdown=True)
    assert "2.00x" in text and "| **2.00x** |" in md
    assert "model FLOP/s" in text and "2.0 G" in text and "20.0%" in text and "10.0 G" in text
    assert md.splitlines()[1].count("---:|") == 8 and md.splitlines()[0].count("|") == md.splitlines()[2].count("|")
    only_failed = [r for r in runs if r["tool"] != "ftkit torch"] + [{"pair": "torch", "data": "chat", "tool": "ftkit torch", "error": "x"}]
    rows = summarize(only_failed, [("torch", "chat")])
    assert rows[0]["tokens_per_s"] is None and rows[2]["tokens_per_s"] is None and "failed" in render(rows, markdown=False)
