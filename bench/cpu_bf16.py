"""bf16 autocast against fp32 on this CPU: ftkit's torch backend and a plain Trainer + PEFT, on the same rows.

    python bench/cpu_bf16.py --markdown                # SmolLM2-135M, 20 steps x 4 WikiSQL rows, 2 repetitions (~10 min on 2 idle cores)
    python bench/cpu_bf16.py --smoke --json            # a tiny model, 2 steps, in this process: tests/test_cpu_bf16.py
    python bench/cpu_bf16.py --tools ftkit --steps 30 --reps 3 --model DIR

What `torch.precision = "auto"` picks on a CPU rests on this measurement and on the quickstart's validation loss in
both precisions (`ftkit train recipes/quickstart.toml --set torch.precision=fp32`, then `=bf16`); ftkit_torch/precision.py
holds the figures and the verdict. Both tools get bench/speed.py's torch-pair settings (bench/harness/settings.py: LoRA r8, alpha
16, every linear layer, AdamW, lr 2e-4 cosine, clipping at 1.0, seed 0, one epoch of the same WikiSQL rows),
and after training each validates once, outside the timed loop, on the same fixed slice of WikiSQL's valid
split. The two precisions are what each tool does when asked for them:
  fp32  weights and math in fp32.
  bf16  the frozen base in bf16, the LoRA weights fp32, the forward and backward under bf16 autocast
        (ftkit: torch.precision = "bf16"; the Trainer: the model loaded in bf16 and TrainingArguments(bf16=True),
        PEFT keeping the adapter in fp32).
Runs alternate the precisions (fp32, bf16, fp32, bf16 ... for each tool in turn) so that other load on the
machine falls on both alike; /proc/loadavg is read before and after every run. Columns:
  trained tok/s   the rows' target tokens / training-loop seconds (bench/speed.py's definition)
  final loss      the mean training loss over the last report window, as each tool computes it
  valid loss      each tool's own validation loss on the slice, in the precision it trained in (ftkit: mean
                  over the target tokens; the Trainer: `evaluate()`'s eval_loss, the mean of per-batch means)
  weights         the dtype of the frozen weights, as the run reported it
The summary shows medians over the repetitions and, under each tool, bf16 against fp32: the tok/s ratio and
the losses' relative difference. Every run is listed after it with its load average. Timings on a shared
machine are noisy: rerun on a quiet one. --smoke trains in this process (no child's ~8 s of imports) and
measures nothing; it keeps the script from rotting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import datasets, models, process  # noqa: E402
from harness.runs import child_env  # noqa: E402
from harness.settings import Settings, baseline_config, ftkit_recipe, ftkit_sets  # noqa: E402

REPO = HERE.parent
TOOLS = {"ftkit": "ftkit torch", "trainer": "Trainer+PEFT"}
PRECISIONS = ("fp32", "bf16")
VALID = REPO / "data" / "wikisql" / "valid.jsonl"
FORMATS = {"tokens_per_s": ",.1f", "train_s": ".1f", "final_loss": ".4f", "valid_loss": ".4f"}  # the measured columns, in the tables' order
HEADERS = ("tool", "precision", "weights", "trained tok/s", "train s", "final loss", "valid loss", "load avg before -> after")
FULL = {"steps": 20, "batch_size": 4, "reps": 2, "valid_rows": 40, "model": "smollm2"}
SMOKE = {"steps": 2, "batch_size": 2, "reps": 1, "valid_rows": 4, "model": "tiny"}


def cpu_flags() -> list[str]:
    """The CPU's bf16 features as /proc/cpuinfo lists them (empty where there is no /proc/cpuinfo)."""
    from ftkit_torch.precision import cpu_flags as all_flags

    return sorted(f for f in all_flags() if "bf16" in f or f.startswith("amx"))


# ---------------------------------------------------------------- one run of each tool


def _ftkit_figures(run_dir: Path) -> dict:
    """Start and end of the training loop, final and validation loss, and the weights' dtype, from metrics.jsonl."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    run = next(r for r in recs if r.get("kind") == "run")  # logged just before the first step
    train = [r for r in recs if r.get("kind") == "train"]
    valid = [r for r in recs if r.get("kind") == "valid"]
    state = json.loads((run_dir / "final_state.json").read_text())
    return {"start": run["time"], "end": train[-1]["time"], "steps": train[-1]["step"], "examples": state["position"],
            "final_loss": train[-1]["loss"], "valid_loss": valid[-1]["loss"] if valid else None,
            "weights": run.get("dtype"), "precision_reported": run.get("precision")}


def run_ftkit(s: Settings, model: Path, data: Path, run_dir: Path, in_process: bool, timeout: float, work: Path) -> dict:
    run_dir.mkdir(parents=True)
    recipe = run_dir / "recipe-in.toml"
    recipe.write_text(ftkit_recipe(s, model, data, run_dir / "run", "torch"))
    sets = ftkit_sets(s, [f"train.steps_per_eval={s.steps}"])  # one validation, after the last (timed) step
    if in_process:
        from ftkit.recipe.load import load_recipes
        from ftkit.train.stages import run_stages

        t0 = time.time()
        result = run_stages(load_recipes([recipe], [*sets, "data.cache=false"]), "torch", quiet=True)[-1]
        return {**_ftkit_figures(result.run_dir), "wall_s": time.time() - t0}
    cmd = [sys.executable, "-m", "ftkit.cli", "train", str(recipe), "--backend", "torch", "--json"]
    for item in sets:
        cmd += ["--set", item]
    m = process.run(cmd, env=child_env(work), cwd=run_dir, log_prefix=run_dir / "log", timeout_s=timeout)
    if m.returncode != 0:
        return {"error": f"exit {m.returncode}: {m.tail()}"}
    out = json.loads(m.stdout.strip().splitlines()[-1])
    return {**_ftkit_figures(Path(out["run_dir"])), "wall_s": m.wall_s}


def run_trainer(s: Settings, model: Path, data: datasets.BenchData, valid: Path, run_dir: Path, in_process: bool, timeout: float,
                work: Path) -> dict:
    run_dir.mkdir(parents=True)
    config = run_dir / "config.json"
    config.write_text(json.dumps({**baseline_config(s, model, data.file, data.format, run_dir), "valid": str(valid)}, indent=1))
    t0 = time.time()
    if in_process:
        import baseline_trainer

        baseline_trainer.main(str(config))
    else:
        m = process.run([sys.executable, str(HERE / "baseline_trainer.py"), str(config)], env=child_env(work), cwd=run_dir,
                        log_prefix=run_dir / "log", timeout_s=timeout)
        if m.returncode != 0 or not (run_dir / "result.json").exists():
            return {"error": f"exit {m.returncode}: {m.tail()}"}
    r = json.loads((run_dir / "result.json").read_text())
    return {"start": r["start"], "end": r["end"], "steps": r["steps"], "examples": r["examples"], "final_loss": r["final_loss"],
            "valid_loss": r["valid_loss"], "weights": r["frozen_dtype"], "wall_s": time.time() - t0}


# ---------------------------------------------------------------- the table


def summarize(runs: list[dict], tools: list[str]) -> list[dict]:
    """Per tool: the median of each figure at each precision, then bf16 against fp32."""
    rows = []
    for tool in tools:
        med = {}
        for prec in PRECISIONS:
            ok = [r for r in runs if (r["tool"], r["precision"]) == (tool, prec) and "error" not in r]
            med[prec] = {k: statistics.median(r[k] for r in ok) if ok else None for k in FORMATS}
            load = (f"{statistics.median(r['load_before'][0] for r in ok):.2f} -> {statistics.median(r['load_after'][0] for r in ok):.2f}"
                    if ok else "")
            rows.append({"tool": TOOLS[tool], "precision": prec, "weights": ok[0]["weights"] if ok else None, "n": len(ok),
                         "load": load, **med[prec]})
        a, b = med["bf16"], med["fp32"]
        rows.append({"tool": TOOLS[tool], "precision": "bf16 / fp32", "weights": "", "n": None, "load": "",
                     "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"] if a["tokens_per_s"] and b["tokens_per_s"] else None,
                     "train_s": a["train_s"] / b["train_s"] if a["train_s"] and b["train_s"] else None,
                     **{k: a[k] / b[k] - 1 if a[k] is not None and b[k] else None for k in ("final_loss", "valid_loss")}})
    return rows


def _cell(row: dict, k: str) -> str:
    v = row[k]
    if v is None:
        return "failed"
    if row["precision"] == "bf16 / fp32":  # a ratio of speeds, a relative difference of losses
        return f"{v:.2f}x" if k in ("tokens_per_s", "train_s") else f"{v:+.2%}"
    return format(v, FORMATS[k])


def render(rows: list[dict], markdown: bool, headers=HEADERS) -> str:
    body = [[r["tool"], r["precision"], r["weights"] or "", *(_cell(r, k) for k in FORMATS), r["load"]] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * 3 + "---:|" * (len(headers) - 3)]
        return "\n".join(lines + ["| " + " | ".join(f"**{c}**" if r[1] == "bf16 / fp32" and c else c for c in r) + " |" for r in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
                     for cols in [list(headers), ["-" * w for w in widths], *body])


def run_rows(runs: list[dict]) -> list[dict]:
    """Every run, in the order it ran, with the load average before and after it."""
    out = []
    for r in runs:
        load = " / ".join(f"{x:.2f}" for x in r["load_before"]) + " -> " + " / ".join(f"{x:.2f}" for x in r["load_after"])
        out.append({"tool": TOOLS[r["tool"]], "precision": f"{r['precision']} (rep {r['rep'] + 1})", "weights": r.get("weights"),
                    "load": load, **{k: r.get(k) for k in FORMATS}})
    return out


# ---------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--smoke", action="store_true", help="a tiny model, 2 steps, 1 repetition, trained in this process")
    ap.add_argument("--tools", default="ftkit,trainer", help="comma-separated: ftkit, trainer")
    ap.add_argument("--steps", type=int, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--reps", type=int, help="repetitions of each (tool, precision)")
    ap.add_argument("--valid-rows", type=int, help="rows of WikiSQL's valid split to validate on (the first N)")
    ap.add_argument("--model", type=Path, help="model folder (default: SmolLM2-135M-Instruct; --smoke: a tiny config-built Llama)")
    ap.add_argument("--work", type=Path, help="work folder (default: runs/bench-cpu-bf16/<full|smoke>)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before one run is killed")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout (the tables go to stderr)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    process.exit_on_sigterm()
    base = SMOKE if args.smoke else FULL
    steps, batch, reps = args.steps or base["steps"], args.batch_size or base["batch_size"], args.reps or base["reps"]
    n_valid = args.valid_rows or base["valid_rows"]
    tools = args.tools.split(",")
    if not tools or any(t not in TOOLS for t in tools):
        raise SystemExit(f"bench: --tools {args.tools!r}: choose from {', '.join(TOOLS)}.")
    work = (args.work or REPO / "runs" / "bench-cpu-bf16" / ("smoke" if args.smoke else "full")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    s = Settings(steps=steps, batch_size=batch)
    model = models.resolve(base["model"], work, args.model)
    data = datasets.build("wikisql", work, model, s.examples, 0, s.max_seq_length, s.seed)
    valid = data.folder / "valid.jsonl"  # beside train.jsonl: ftkit validates on it; the Trainer is given it
    valid.write_text("\n".join(VALID.read_text(encoding="utf-8").splitlines()[:n_valid]) + "\n", encoding="utf-8")
    say(f"{data.examples} training rows ({data.target_tokens} target tokens, lengths {data.min_length}-{data.max_length}), "
        f"{n_valid} validation rows; CPU bf16 flags: {', '.join(cpu_flags()) or 'none'}")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    for rep in range(reps):
        for tool in tools:
            for prec in PRECISIONS:  # fp32 then bf16, every repetition: load falls on both alike
                ps = s.with_(precision=prec)
                run_dir = work / "runs" / stamp / f"{tool}-{prec}-rep{rep}"
                say(f"rep {rep + 1}/{reps}: {TOOLS[tool]} {prec} ...")
                before = process.loadavg()
                if tool == "ftkit":
                    raw = run_ftkit(ps, model, data.folder, run_dir, args.smoke, args.timeout, work)
                else:
                    raw = run_trainer(ps, model, data, valid, run_dir, args.smoke, args.timeout, work)
                r = {"tool": tool, "precision": prec, "rep": rep, "run_dir": str(run_dir), "load_before": before, "load_after": process.loadavg(), **raw}
                if "error" not in r and (r["steps"], r["examples"]) != (s.steps, s.examples):
                    r["error"] = f"ran {r['steps']} steps over {r['examples']} examples, not {s.steps} over {s.examples}"
                if "error" in r:
                    say(f"FAILED: {TOOLS[tool]} {prec}: {r['error']}")
                else:
                    r["train_s"] = r["end"] - r["start"]
                    r["tokens_per_s"] = data.target_tokens / r["train_s"]
                    say(f"  {r['tokens_per_s']:,.1f} tok/s, train {r['train_s']:.1f} s, loss {r['final_loss']:.4f}, "
                        f"valid {r['valid_loss']:.4f}, weights {r['weights']}, load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}")
                runs.append(r)

    table = summarize(runs, tools)
    header = (f"{model.name}: {s.steps} steps x {s.batch_size} WikiSQL rows, {n_valid} validation rows, LoRA r{s.rank} alpha "
              f"{s.alpha:g} all-linear, medians over {reps} repetition(s); {os.cpu_count()} cores, CPU bf16 flags: "
              f"{', '.join(cpu_flags()) or 'none'}; load average 1 / 5 / 15 min")
    text = "\n".join([header, "", render(table, args.markdown), "", "every run, in order:", "",
                      render(run_rows(runs), args.markdown)])
    report = {"command": "python bench/cpu_bf16.py " + " ".join(sys.argv[1:] if argv is None else argv), "model": str(model),
              "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "settings": s.as_dict(), "valid_rows": n_valid,
              "target_tokens": data.target_tokens, "reps": reps, "table": table, "runs": runs}
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, default=str))
    else:
        print(text)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
