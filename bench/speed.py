"""Speed of ftkit against what users would run instead, on the same data, model and settings.

    python bench/speed.py                      # this CPU: SmolLM2-135M (torch pair), a small config-built Llama (MLX pair)
    python bench/speed.py --smoke --json       # a tiny model, 2 steps, 1 repetition: the test suite's run
    python bench/speed.py --cuda [--qlora]     # a CUDA GPU: a TinyLlama-1.1B-shaped Llama in bf16 (nf4 base with --qlora)
    python bench/speed.py --reps 5 --steps 16 --datasets wikisql,packed --pairs torch --markdown
    python bench/speed.py --ftkit-set data.packing=off     # any ftkit recipe key, for the ftkit runs only

Two pairs, each run in one process tree, on the same training rows, model, sequence length, effective batch,
LoRA (rank, alpha, dropout, every linear layer), optimizer (AdamW, same lr, cosine schedule, no warmup,
weight decay 0) and number of optimizer steps:
  torch: ftkit's torch backend vs a plain transformers.Trainer + PEFT script (bench/baseline_trainer.py);
  mlx:   ftkit's MLX backend vs mlx_lm lora (bench/baseline_mlx.py runs mlx-lm's own training code).
Each run is its own child process (no shared memory or caches), the two tools alternate (A B A B ...), and the
table shows medians over the repetitions, with the ratio ftkit / baseline under each pair:
  trained tok/s  target tokens (non-padding tokens whose prediction is in the loss) / training-loop seconds.
                 Every run trains on each row of its data set exactly once (the set has steps x batch x
                 accumulation rows), so the token count is the same for both tools: the rows' target tokens
                 as ftkit's data pipeline masks them. The loop's seconds run from the tool's first step
                 (after loading and tokenizing) to the end of its last optimizer step, from its own clock.
  model FLOP/s   the model FLOPs of those rows (bench/harness/flops.py: ftkit.train.flops' count of LoRA's forward and
                 backward, attention per example, the head where the loss is read) / the same seconds. Both tools
                 train the same rows, so the same FLOPs: the ratio is the tokens/s ratio; the figure says how far
                 each is from the machine's limit:
  of GEMM peak   that rate as a fraction of the GEMM peak,
  GEMM peak      the best rate of this model's matrix products (hidden x hidden, hidden x intermediate, ~ a
                 micro-batch of tokens) in the pair's dtype on this machine, measured by the benchmark in its own
                 process before the runs and after them (the larger is used; both are in the JSON and the notes).
                 ftkit's runs get the one before as their MFU peak (FTKIT_PEAK_FLOPS): no probe of their own.
  train s        those seconds; wall s: the whole child process (imports, load, tokenize, train, save).
  peak RSS MiB   peak resident memory of the child's process tree (bench/harness/process.py).
  final loss     mean training loss over the last report window (about the last quarter of the steps), as
                 each tool computes it; the tools see the rows in different orders, so it agrees only roughly.
Results: bench/RESULTS.md. Figures from a machine shared with other work are noisy: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import datasets, models, process  # noqa: E402
from harness import flops as bench_flops
from harness import runs as tool_runs
from harness.settings import PROFILES, ftkit_sets  # noqa: E402

REPO = HERE.parent
PAIRS = {"torch": ("ftkit torch", "Trainer+PEFT"), "mlx": ("ftkit mlx", "mlx_lm lora")}
METRICS = ("tokens_per_s", "flops_per_s", "peak_fraction", "train_s", "wall_s", "peak_rss_mib", "final_loss")
HEADERS = ("pair", "data", "tool", "trained tok/s", "model FLOP/s", "of GEMM peak", "GEMM peak FLOP/s", "train s", "wall s",
           "peak RSS MiB", "final loss")
COLUMNS = ("tokens_per_s", "flops_per_s", "peak_fraction", "gemm_peak", "train_s", "wall_s", "peak_rss_mib", "final_loss")


# ---------------------------------------------------------------- the table


def summarize(runs: list[dict], cells: list[tuple[str, str]], peaks: dict[str, float] | None = None) -> list[dict]:
    """Per (pair, data): the median of each figure for both tools (and the pair's GEMM peak), then their ratio."""
    rows = []
    for pair, name in cells:
        meds = {}
        for tool in PAIRS[pair]:
            ok = [r for r in runs if (r["pair"], r["data"], r["tool"]) == (pair, name, tool) and "error" not in r]
            meds[tool] = {k: _median([r.get(k) for r in ok]) for k in METRICS}
            rows.append({"pair": pair, "data": name, "tool": tool, "n": len(ok), **meds[tool], "gemm_peak": (peaks or {}).get(pair)})
        a, b = (meds[t] for t in PAIRS[pair])
        ratio = {k: a[k] / b[k] if a[k] is not None and b[k] else None for k in METRICS}
        rows.append({"pair": pair, "data": name, "tool": "ftkit / baseline", "n": None, **ratio, "gemm_peak": None})
    return rows


def _median(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def _si(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= scale:
            return f"{v / scale:,.1f} {unit}"
    return f"{v:,.0f}"


def _cell(row: dict, k: str) -> str:
    v = row.get(k)
    if k == "gemm_peak":  # one figure per pair: no ratio
        return _si(v) if v else "-"
    if v is None:
        return "failed"
    if row["tool"] == "ftkit / baseline":
        return f"{v:.2f}x"
    return {"tokens_per_s": f"{v:,.0f}" if v >= 100 else f"{v:.1f}", "flops_per_s": _si(v), "peak_fraction": f"{100 * v:.1f}%",
            "train_s": f"{v:.1f}", "wall_s": f"{v:.1f}", "peak_rss_mib": f"{v:,.0f}", "final_loss": f"{v:.4f}"}[k]


def render(rows: list[dict], markdown: bool) -> str:
    body = [[r["pair"], r["data"], r["tool"], *(_cell(r, k) for k in COLUMNS)] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * 3 + "---:|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(c if r[2] != "ftkit / baseline" else f"**{c}**" for c in r) + " |" for r in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(HEADERS)]
    fmt = lambda cols: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))  # noqa: E731
    out = [fmt(HEADERS), fmt(["-" * w for w in widths])]
    for i, r in enumerate(body):
        out.append(fmt(r))
        if r[2] == "ftkit / baseline" and i != len(body) - 1:
            out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- where it ran


def machine() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True)
        gpu = q.stdout.strip() or None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu,
            "os": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "mlx", "mlx-lm", "tokenizers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    dirty = bool(git("status", "--porcelain", "--", "ftkit", "backends"))
    out["ftkit"] = (git("rev-parse", "--short=12", "HEAD") or "unknown") + (" + uncommitted changes in ftkit/ or backends/" if dirty else "")
    return out


def mlx_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("mlx", "mlx_lm"))


# ---------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--smoke", action="store_const", const="smoke", dest="profile", help="= --profile smoke")
    ap.add_argument("--cuda", action="store_const", const="cuda", dest="profile", help="= --profile cuda")
    ap.add_argument("--qlora", action="store_true", help="base model in nf4 (bitsandbytes), for both tools of the torch pair")
    ap.add_argument("--pairs", help="comma-separated: torch, mlx (default: the profile's)")
    ap.add_argument("--datasets", help="comma-separated: wikisql, chat, packed (default: all three)")
    ap.add_argument("--reps", type=int, help="repetitions of each run (median reported)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--grad-accum", type=int)
    ap.add_argument("--max-seq-length", type=int)
    ap.add_argument("--packed-length", type=int, help="tokens per row of the packed data set")
    ap.add_argument("--gradient-checkpointing", action="store_true", default=None)
    ap.add_argument("--torch-model", type=Path, help="model folder for the torch pair (default: the profile's)")
    ap.add_argument("--mlx-model", type=Path, help="model folder for the MLX pair (default: the profile's)")
    ap.add_argument("--ftkit-set", action="append", default=[], metavar="KEY=VALUE", help="extra ftkit recipe override (repeatable)")
    ap.add_argument("--work", type=Path, help="work folder (models are cached there; default: runs/bench-speed/<profile>)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before one run is killed")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout (the table goes to stderr)")
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (for bench/RESULTS.md)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    process.exit_on_sigterm()
    profile = PROFILES[args.profile]
    s = profile.settings.with_(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                               max_seq_length=args.max_seq_length, gradient_checkpointing=args.gradient_checkpointing,
                               quantize="nf4" if args.qlora else None)
    reps = args.reps or profile.reps
    packed_length = args.packed_length or profile.packed_length
    chosen = {p: args.datasets.split(",") if args.datasets else list(profile.datasets.get(p, ())) for p in PAIRS}
    pairs = args.pairs.split(",") if args.pairs else list(profile.pairs)
    notes = list(profile.notes)
    for p in pairs:
        if p not in PAIRS:
            raise SystemExit(f"bench: unknown pair {p!r}; choose from {', '.join(PAIRS)}.")
    if "mlx" in pairs and not mlx_available():
        pairs.remove("mlx")
        notes.append("the MLX pair was skipped: mlx and mlx-lm are not installed (pip install 'ftkit[mlx]')")
    if "mlx" in pairs and s.quantize != "none":
        notes.append("--qlora applies to the torch pair only; the MLX pair trains the unquantized model")
    work = (args.work or REPO / "runs" / "bench-speed" / profile.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    pair_settings = {"torch": s, "mlx": s.with_(quantize="none")}
    if "mlx" in pairs and s.max_grad_norm is not None:
        pair_settings["mlx"] = replace(pair_settings["mlx"], max_grad_norm=None)
        notes.append("MLX pair: gradient clipping off in both tools (mlx_lm lora has none)")
    pair_model = {}
    for p in pairs:
        override = args.torch_model if p == "torch" else args.mlx_model
        pair_model[p] = models.resolve(profile.torch_model if p == "torch" else profile.mlx_model, work, override)
    data = {}
    for p in pairs:
        for name in dict.fromkeys([*chosen[p], *datasets.FORMATS]):  # every set is built (cheap): the builders cannot rot
            ps = pair_settings[p]
            data[p, name] = datasets.build(name, work, pair_model[p], ps.examples, packed_length, ps.max_seq_length, ps.seed)
            d = data[p, name]
            d.flops = bench_flops.data_flops(pair_model[p], ps, d)
            say(f"{p}/{name}: {d.examples} rows, {d.target_tokens} target tokens of {d.tokens}, lengths {d.min_length}-{d.max_length} "
                f"(median {d.median_length}), {d.flops / 1e12:.3g} TFLOP per pass")

    cells = [(p, n) for p in pairs for n in chosen[p]]
    # The machine's GEMM peak at each pair's model sizes, before the runs (and after them, below): in this process, alone.
    shapes = {p: bench_flops.gemm_shapes(pair_model[p], pair_settings[p], data[p, chosen[p][0] if chosen[p] else "wikisql"]) for p in pairs}
    gemm = {p: [bench_flops.gemm_peak(p, pair_settings[p], shapes[p], profile.gemm_seconds)] for p in pairs}
    for p in pairs:
        say(f"{p}: GEMM peak {gemm[p][0]['flops'] / 1e9:,.1f} GFLOP/s ({gemm[p][0]['dtype']}, {gemm[p][0]['device']}, "
            f"(m, k, n) = {', '.join('x'.join(map(str, x)) for x in shapes[p])})")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None  # a busy machine makes every figure noisy
    runs = []
    for rep in range(reps):
        for p, name in cells:
            ps, d = pair_settings[p], data[p, name]
            for tool in PAIRS[p]:  # A then B, every repetition
                run_dir = work / "runs" / stamp / f"{p}-{name}-{tool.replace(' ', '_').replace('+', '_')}-rep{rep}"
                say(f"rep {rep + 1}/{reps}: {tool} on {name} ...")
                if tool.startswith("ftkit"):
                    raw = tool_runs.ftkit(p, ps, pair_model[p], d.folder, run_dir, args.ftkit_set, args.timeout, work=work,
                                          peak_flops=gemm[p][0]["flops"])
                else:
                    raw = tool_runs.baseline(p, ps, pair_model[p], d, run_dir, args.timeout, work=work)
                r = {"pair": p, "data": name, "tool": tool, "rep": rep, "run_dir": str(run_dir), **tool_runs.finish(raw, ps, d)}
                runs.append(r)
                if "error" in r:
                    say(f"FAILED: {tool} on {name}: {r['error']}")
                else:
                    say(f"  {r['tokens_per_s']:,.1f} tok/s, {(r['flops_per_s'] or 0) / 1e9:,.2f} GFLOP/s, train {r['train_s']:.1f} s, wall {r['wall_s']:.1f} s, "
                        f"peak {r['peak_rss_mib']:,.0f} MiB, loss {r['final_loss']:.4f}")
    for p, name in cells:
        d = data[p, name]
        for tool in PAIRS[p]:
            own = {r["own_target_tokens"] for r in runs if (r["pair"], r["data"], r["tool"]) == (p, name, tool) and "error" not in r}
            if own and own != {d.target_tokens}:
                notes.append(f"{tool} on {name} counts {sorted(own)[0]} target tokens itself; the table uses the reference {d.target_tokens}")

    peak = {}
    for p in pairs:
        gemm[p].append(bench_flops.gemm_peak(p, pair_settings[p], shapes[p], profile.gemm_seconds))
        before, after = (g["flops"] for g in gemm[p])
        peak[p] = max(before, after)
        notes.append(f"{p} pair: GEMM peak {before / 1e9:,.1f} GFLOP/s before the runs, {after / 1e9:,.1f} after ({gemm[p][0]['dtype']}, "
                     f"{gemm[p][0]['device']}); 'of GEMM peak' uses the larger (ftkit's own MFU in metrics.jsonl, the one before)")
    for r in runs:
        if r.get("flops_per_s"):
            r["peak_fraction"] = r["flops_per_s"] / peak[r["pair"]]
    rows = summarize(runs, cells, peak)
    report = {
        "profile": profile.name, "command": "python bench/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": os.getloadavg() if load_before else None},
        "started": stamp, "versions": versions(), "reps": reps, "pairs": pairs,
        "settings": {p: pair_settings[p].as_dict() for p in pairs}, "ftkit_sets": {p: ftkit_sets(pair_settings[p], args.ftkit_set) for p in pairs},
        "models": {p: models.describe(pair_model[p]) for p in pairs},
        "datasets": {f"{p}/{n}": d.as_dict() for (p, n), d in data.items()},
        "gemm_peak": gemm, "table": rows, "runs": runs, "notes": notes,
    }
    table = render(rows, args.markdown)
    header = (f"{profile.name}: {s.steps} steps x {s.batch_size} x {s.grad_accum} examples, LoRA r{s.rank} alpha {s.alpha:g} all-linear, "
              f"{s.precision}{', nf4 base' if s.quantize != 'none' else ''}, medians over {reps} repetition(s)")
    if load_before:
        notes.append(f"load average (1 min) {load_before[0]:.1f} before, {report['machine']['load_average_after'][0]:.1f} after, "
                     f"on {os.cpu_count()} cores")
    text = "\n".join([header, "", table, *(f"note: {n}" for n in notes)])
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, default=str))
    else:
        print(text)
    failed = [r for r in runs if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
