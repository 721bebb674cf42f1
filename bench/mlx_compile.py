"""The compiled MLX step ([mlx] compile = true) against the eager one, through ftkit's own loop.

    python bench/mlx_compile.py --model mlx-small --steps 20 --reps 2
    python bench/mlx_compile.py --model smollm2 --steps 3 --reps 1      # 2-4 min a step on a 2-core CPU
    python bench/mlx_compile.py --model tiny --steps 4 --dropout 0.1 --check   # also: the same losses and adapter

Each run trains LoRA (r 8, alpha 16, every linear layer; the quickstart's settings: WikiSQL {"text"} rows,
loss on every token, batch 4, packed rows, max_seq_length 512) for --steps optimizer steps, a report every
step, no validation inside the timed steps. A step's time is the difference of metrics.jsonl's `elapsed`
between reports: the first one holds the compile (its traces), "steady" is the median of the others.
Runs alternate eager and compiled so that other load on the machine falls on both alike; /proc/loadavg is
printed beside each run. Timings on a shared machine are noisy: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import models, process  # noqa: E402

REPO = HERE.parent


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in process.loadavg())


def run(model: Path, work: Path, name: str, compiled: bool, args) -> dict:
    import tomli_w

    from ftkit.recipe.load import load_recipes
    from ftkit.train.loop import Trainer
    from ftkit.train.prepare import prepare

    body = {
        "model": {"path": str(model)},
        "method": {"kind": "lora", "rank": 8, "alpha": 16, "dropout": args.dropout, "targets": "all-linear"},
        "data": {"path": str(REPO / "data" / "wikisql"), "max_seq_length": 512},
        "train": {"iters": args.steps, "batch_size": 4, "lr": 3e-4, "scheduler": "cosine", "warmup": 0.05,
                  "steps_per_report": 1, "steps_per_eval": 10**6, "val_batches": 1, "save_every": 10**6, "seed": 0},
        "mlx": {"compile": compiled},
        "output": {"dir": str(work / f"run-{name}")},
    }
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(body))
    (recipe,) = load_recipes([path])
    before = loadavg()
    t0 = time.perf_counter()
    trainer = Trainer(prepare(recipe), "mlx", quiet=True)
    result = trainer.run()
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    elapsed = [r["elapsed"] for r in train]
    times = [elapsed[0]] + [b - a for a, b in zip(elapsed, elapsed[1:])]
    step = trainer.backend.step
    return {"compiled": compiled, "first_s": times[0], "steady_s": statistics.median(times[1:]) if len(times) > 1 else None,
            "times": times, "losses": [r["loss"] for r in train], "traces": step.traces, "wall_s": wall,
            "load_before": before, "load_after": loadavg(), "adapter": result.adapter}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlx-small", help="smollm2, or a config-built shape of bench/harness/models.py")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--check", action="store_true", help="assert that both give the same losses and adapter bytes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    work = Path(tempfile.mkdtemp(prefix="ftkit-mlx-compile-"))
    model = models.resolve(args.model, REPO / "runs" / "bench-work")
    rows = []
    for rep in range(args.reps):
        for compiled in (False, True):
            rows.append(run(model, work, f"{'compiled' if compiled else 'eager'}-{rep}", compiled, args))
            r = rows[-1]
            print(f"[bench] {args.model} {'compiled' if compiled else 'eager   '} rep {rep}: first step {r['first_s']:.2f} s, "
                  f"steady {r['steady_s'] or float('nan'):.3f} s/step, traces {r['traces']}, load {r['load_before']} -> {r['load_after']}",
                  file=sys.stderr, flush=True)
    if args.check:
        from ftkit.common.tensors import read_safetensors

        eager, comp = rows[0], rows[1]
        assert eager["losses"] == comp["losses"], (eager["losses"], comp["losses"])
        a, b = (read_safetensors(Path(r["adapter"]) / "adapter_model.safetensors") for r in (eager, comp))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "adapters differ"
        print("[bench] same losses and adapter bytes", file=sys.stderr)
    for r in rows:
        r.pop("adapter")
    if args.json:
        print(json.dumps(rows))
        return
    print(f"| {args.model} | step | first step s | steady s/step | traces | load avg before -> after |\n|---|---|---|---|---|---|")
    for r in rows:
        steady = f"{r['steady_s']:.3f}" if r["steady_s"] is not None else "-"
        print(f"| | {'compiled' if r['compiled'] else 'eager'} | {r['first_s']:.2f} | {steady} | {r['traces']} | "
              f"{r['load_before']} -> {r['load_after']} |")
    eager = [r["steady_s"] for r in rows if not r["compiled"] and r["steady_s"]]
    comp = [r["steady_s"] for r in rows if r["compiled"] and r["steady_s"]]
    if eager and comp:
        print(f"\nsteady-state: eager {statistics.median(eager):.3f} s/step, compiled {statistics.median(comp):.3f} s/step, "
              f"x{statistics.median(eager) / statistics.median(comp):.2f}")


if __name__ == "__main__":
    main()
