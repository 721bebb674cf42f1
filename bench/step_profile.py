"""Where an ftkit torch training step's time goes, against the machine's GEMM peak: the answer to "why not 100%".

    python bench/step_profile.py                 # SmolLM2-135M, bench/speed.py's torch pair on WikiSQL (batch 4, 6 steps)
    python bench/step_profile.py --data chat --steps 8 --batch-size 16 --json
    python bench/step_profile.py --smoke --json  # a tiny model, 3 steps: tests/test_step_profile.py

It trains exactly bench/speed.py's ftkit torch run (same rows, recipe and settings; in this process) under
torch.profiler, leaves the first step out (warm-up), and sorts the other steps' operator self time into:
  matrix products   aten::mm / addmm / bmm (the frozen base's and the adapter's, forward and backward) and the
                    rate they reach (2 m k n of each call, from its recorded shapes, over their time)
  attention         scaled-dot-product attention, forward and backward
  loss              log-softmax and NLL over the vocabulary (forward and backward)
  copies            copies, casts, concatenation, indexing, embedding lookups
  elementwise       everything else the operators do (norms, activations, RoPE, residual adds, the optimizer's
                    foreach updates, gradient clipping)
  framework         the step's wall time that no operator accounts for: Python (ftkit's loop, PEFT's and
                    transformers' modules), autograd bookkeeping and dispatch
and sets that beside the model FLOP/s the run reaches (ftkit's own count, as in metrics.jsonl) and the GEMM peak
measured in this process before the run (bench/harness/flops.py: the model's matrix shapes, the pair's dtype).
The profiler adds overhead of its own to every operator; the step time is printed with and without it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from harness import datasets, models, process  # noqa: E402
from harness import flops as bench_flops  # noqa: E402
from harness.settings import PROFILES, ftkit_recipe, ftkit_sets  # noqa: E402

GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
LOSS = ("log_softmax", "nll_loss", "cross_entropy")
COPIES = ("copy_", "_to_copy", "aten::to", "clone", "contiguous", "aten::cat", "index", "embedding", "gather", "scatter",
          "aten::stack", "masked_fill", "aten::fill_", "aten::zero_", "aten::empty", "resize_")
CATEGORIES = ("matrix products", "attention", "loss", "copies", "elementwise", "framework")


def category(op: str) -> str:
    if op in GEMM:
        return "matrix products"
    if "scaled_dot_product" in op or "flash_attention" in op or "_efficient_attention" in op:
        return "attention"
    if any(k in op for k in LOSS):
        return "loss"
    if any(k in op for k in COPIES):
        return "copies"
    return "elementwise"


def matmul_flops(op: str, shapes: list[list[int]]) -> float:
    """2 m k n (times the batch) of one call, from its recorded input shapes."""
    if op in ("aten::addmm", "aten::baddbmm"):
        shapes = shapes[1:]  # the added term comes first
    a, b = shapes[0], shapes[1]
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def fresh(folder: Path) -> Path:
    """A run folder with no earlier run in it (ftkit would refuse to start over one)."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def run(s, model: Path, data: datasets.BenchData, work: Path) -> dict:
    """Train the bench run once under the profiler; per category: self seconds over the timed steps, GEMM FLOPs."""
    import torch
    from ftkit_torch.backend import TorchBackend
    from torch.profiler import ProfilerActivity, profile, schedule

    from ftkit.recipe.load import load_recipes
    from ftkit.train.stages import run_stages

    run_dir = fresh(work / "run")
    recipe = work / "recipe.toml"
    recipe.write_text(ftkit_recipe(s, model, data.folder, run_dir, "torch"))
    marks: list[float] = []
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=s.steps - 1, repeat=1),
                   record_shapes=True, acc_events=True)  # not with_flops: it slows every operator down (mul 5x here)
    step = TorchBackend.optimizer_step

    def stepped(self, *a, **k):
        out = step(self, *a, **k)
        marks.append(time.perf_counter())
        prof.step()
        return out

    TorchBackend.optimizer_step = stepped
    try:
        with prof:
            result = run_stages(load_recipes([recipe], [*ftkit_sets(s, []), "data.cache=false"]), "torch", quiet=True)[-1]
    finally:
        TorchBackend.optimizer_step = step
    wall = marks[-1] - marks[0]  # the timed steps: from the end of step 1 to the end of the last
    self_s, gemm_flops, ops = defaultdict(float), 0.0, defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        if not e.key.startswith("aten::"):  # ProfilerStep#, Optimizer.step#..., autograd::engine...: spans, not work
            continue
        sec = e.self_cpu_time_total / 1e6
        self_s[category(e.key)] += sec
        ops[e.key] += sec
        if e.key in GEMM:
            gemm_flops += e.count * matmul_flops(e.key, e.input_shapes)
    self_s["framework"] = max(0.0, wall - sum(self_s.values()))
    recs = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in recs if r.get("kind") == "train"]
    return {"wall_s": wall, "steps": s.steps - 1, "self_s": dict(self_s), "gemm_flops": gemm_flops,
            "top_ops": sorted(ops.items(), key=lambda kv: -kv[1])[:12], "torch_threads": torch.get_num_threads(),
            "ftkit_flops_per_sec": [r.get("flops_per_sec") for r in train], "ftkit_tokens_per_sec": [r.get("tokens_per_sec") for r in train]}


def unprofiled_step_s(s, model: Path, data: datasets.BenchData, work: Path) -> float:
    """The same steps without the profiler: seconds per step (first step left out), from the same clock."""
    from ftkit_torch.backend import TorchBackend

    from ftkit.recipe.load import load_recipes
    from ftkit.train.stages import run_stages

    recipe = work / "recipe-plain.toml"
    recipe.write_text(ftkit_recipe(s, model, data.folder, fresh(work / "run-plain"), "torch"))
    marks: list[float] = []
    step = TorchBackend.optimizer_step

    def stepped(self, *a, **k):
        out = step(self, *a, **k)
        marks.append(time.perf_counter())
        return out

    TorchBackend.optimizer_step = stepped
    try:
        run_stages(load_recipes([recipe], [*ftkit_sets(s, []), "data.cache=false"]), "torch", quiet=True)
    finally:
        TorchBackend.optimizer_step = step
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="wikisql", choices=("wikisql", "chat", "packed"))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (the first is warm-up, not counted)")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the profile's, 4)")
    ap.add_argument("--model", type=Path, default=None, help="a model folder instead of the profile's")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, 3 steps (the test suite's run)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout (the table goes to stderr)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else "cpu"]
    s = profile.settings.with_(steps=args.steps or (3 if args.smoke else profile.settings.steps),
                               batch_size=args.batch_size or profile.settings.batch_size)
    work = (args.work or REPO / "runs" / "bench-step-profile" / ("smoke" if args.smoke else "full")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = models.resolve(profile.torch_model, work, args.model)
    data = datasets.build(args.data, work, model, s.examples, profile.packed_length, s.max_seq_length, s.seed)
    load_before = process.loadavg()
    shapes = bench_flops.gemm_shapes(model, s, data)
    peaks = [bench_flops.gemm_peak("torch", s, shapes, profile.gemm_seconds)]
    model_flops_step = bench_flops.data_flops(model, s, data) / s.steps  # the rows are spread evenly over the steps
    plain = unprofiled_step_s(s, model, data, work)
    r = run(s, model, data, work)
    load_after = process.loadavg()
    peaks.append(bench_flops.gemm_peak("torch", s, shapes, profile.gemm_seconds))
    peak = max(peaks, key=lambda g: g["flops"])  # as bench/speed.py: the probe before the runs and after, the larger
    per_step = r["wall_s"] / r["steps"]
    rows = []
    for c in CATEGORIES:
        sec = r["self_s"].get(c, 0.0) / r["steps"]
        rate = r["gemm_flops"] / r["steps"] / sec if c == "matrix products" and sec else None
        rows.append({"part": c, "ms_per_step": 1e3 * sec, "share": sec / per_step, "gflops": rate / 1e9 if rate else None,
                     "of_peak": rate / peak["flops"] if rate else None})
    report = {"command": "python bench/step_profile.py " + " ".join(sys.argv[1:] if argv is None else argv), "model": str(model),
              "data": data.as_dict(), "settings": s.as_dict(), "gemm_peak": peak, "gemm_peaks": peaks, "load_before": load_before, "load_after": load_after,
              "step_s_profiled": per_step, "step_s_unprofiled": plain, "model_flops_per_step": model_flops_step,
              "model_flops_per_sec_unprofiled": model_flops_step / plain, "mfu_unprofiled": model_flops_step / plain / peak["flops"],
              "profiler_gemm_flops_per_step": r["gemm_flops"] / r["steps"], "rows": rows, "top_ops_s": r["top_ops"],
              "torch_threads": r["torch_threads"]}
    both = " / ".join(f"{g['flops'] / 1e9:.1f}" for g in peaks)
    lines = [f"{model.name}, {data.name} ({data.examples} rows, lengths {data.min_length}-{data.max_length}), batch {s.batch_size}, "
             f"{r['steps']} timed steps, {r['torch_threads']} torch threads; load {load_before[0]:.2f} -> {load_after[0]:.2f}",
             f"GEMM peak {peak['flops'] / 1e9:.1f} GFLOP/s ({peak['dtype']}, shapes {peak['shapes']}; before / after the runs: "
             f"{both}); step {plain:.3f} s unprofiled, "
             f"{per_step:.3f} s profiled; model FLOPs/step {model_flops_step / 1e9:.1f} G -> {model_flops_step / plain / 1e9:.1f} GFLOP/s "
             f"= {100 * report['mfu_unprofiled']:.1f}% of the GEMM peak; the profiler counts {r['gemm_flops'] / r['steps'] / 1e9:.1f} "
             "GFLOP of matrix products per step", "",
             "| part of the step | ms / step | share | GFLOP/s | of GEMM peak |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        g = f"{row['gflops']:.1f}" if row["gflops"] else ""
        p = f"{100 * row['of_peak']:.1f}%" if row["of_peak"] else ""
        lines.append(f"| {row['part']} | {row['ms_per_step']:.1f} | {100 * row['share']:.1f}% | {g} | {p} |")
    lines += ["", "largest operators (s over the timed steps): " + ", ".join(f"{k} {v:.2f}" for k, v in r["top_ops"])]
    text = "\n".join(lines)
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
