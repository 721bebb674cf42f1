"""How ftkit's cost grows: step time against sequence length, peak memory against data-set size, and
tokens/s against batch size, each beside the Trainer + PEFT baseline where asked.

    python bench/scaling.py seq-len    [--lengths 256,512,1024,2048,4096] [--tools ftkit,trainer]
    python bench/scaling.py data-size  [--sizes 1000,10000,100000,1000000]
    python bench/scaling.py batch-size [--sizes 1,2,4,8,16] [--tools ftkit,trainer]
    python bench/scaling.py all --markdown --out scaling.json

seq-len     batch 1 of already-packed rows of exactly that many tokens, SmolLM2-135M (--model), fp32 on a CPU;
            seconds per optimizer step is the median over the steps after the first (which pays for lazy
            set-up), and "per 1k tokens" divides it by the row length: flat means linear cost.
data-size   N short real rows (BANKING77 queries as {"text"}, cycled to N) through a model too small to
            matter (2 layers, hidden 64, SmolLM2's tokenizer): the run's peak resident memory is then the data
            pipeline's. Two optimizer steps; "to first step" is the time from process start to the first
            step (reading and tokenizing the rows, loading the model).
batch-size  WikiSQL rows (varied lengths), SmolLM2-135M: trained target tokens per second of the training
            loop at each micro-batch size, the same settings otherwise.
Every run is its own child process, measured as bench/speed.py measures (bench/harness/process.py), with a
memory cap (--max-memory-gib, default 80% of the memory available at start) past which the run is killed
and reported as not fitting, instead of waking the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import datasets, models, process, runs  # noqa: E402
from harness.settings import Settings, ftkit_sets  # noqa: E402

REPO = HERE.parent
TOOLS = {"ftkit": "ftkit torch", "trainer": "Trainer+PEFT"}


def _run(tool: str, s: Settings, model: Path, data: datasets.BenchData, run_dir: Path, args) -> dict:
    cap = int(args.max_memory_gib * 2**30)
    if tool == "ftkit":
        raw = runs.ftkit("torch", s, model, data.folder, run_dir, args.ftkit_set, args.timeout, max_rss_bytes=cap, work=args.work_dir)
    else:
        raw = runs.baseline("torch", s, model, data, run_dir, args.timeout, max_rss_bytes=cap, work=args.work_dir)
    return runs.finish(raw, s, data)


def _step_seconds(r: dict) -> float | None:
    """Median seconds per step after the first (report_every is 1 in these runs: one report per step)."""
    ends = r.get("report_ends") or []
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    return statistics.median(gaps) if gaps else None


def _row(tool: str, r: dict, **fields) -> dict:
    if "error" in r:
        why = "did not fit under the memory cap" if r.get("over_memory_cap") else r["error"].splitlines()[0][:120]
        return {"tool": TOOLS[tool], **fields, "error": why, "peak_rss_mib": r.get("peak_rss_bytes", 0) / 2**20}
    return {"tool": TOOLS[tool], **fields, "peak_rss_mib": r["peak_rss_mib"], "tokens_per_s": r["tokens_per_s"],
            "train_s": r["train_s"], "wall_s": r["wall_s"], "final_loss": r["final_loss"]}


def seq_len(args, work: Path, say) -> list[dict]:
    model = models.resolve("smollm2", work, args.model)
    out = []
    for length in [int(x) for x in args.lengths.split(",")]:
        s = Settings(steps=args.steps or 4, batch_size=1, max_seq_length=length + 64)
        data = datasets.build("packed", work, model, s.examples, length, s.max_seq_length)
        for tool in args.tools.split(","):
            say(f"seq-len {length}: {tool} ...")
            r = _run(tool, s, model, data, work / "runs" / f"seq{length}-{tool}-{time.strftime('%H%M%S')}", args)
            row = _row(tool, r, length=length)
            if "error" not in row:
                row["s_per_step"] = _step_seconds(r)
                row["s_per_1k_tokens"] = row["s_per_step"] / (data.tokens / s.examples) * 1000
            out.append(row)
            say(f"  {row}")
    return out


def data_size(args, work: Path, say) -> list[dict]:
    model = models.resolve("tiny-smollm2", work, None)
    texts = [json.loads(line)["messages"][1]["content"] for line in (datasets.CHAT / "train.jsonl").read_text().splitlines()
             if json.loads(line)["messages"][0]["content"].startswith("Classify")]
    out = []
    for n in [int(x) for x in args.sizes.split(",")]:
        folder = work / "data" / f"short-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "train.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps({"text": texts[i % len(texts)]}) + "\n")
        s = Settings(steps=2, batch_size=4)
        # counted without ftkit's pipeline here: a million rows would take the parent as long as the run
        data = datasets.BenchData("short", "text", folder, n, 0, 0, 0, 0, 0)
        cap = int(args.max_memory_gib * 2**30)
        # ftkit twice: the first run tokenizes into its token cache (a fresh file, so a cold one), the second reads it
        for tool, cache in [(t, c) for t in args.tools.split(",") for c in (("cold", "warm") if t == "ftkit" else ("-",))]:
            say(f"data-size {n}: {tool} (token cache {cache}) ...")
            run_dir = work / "runs" / f"size{n}-{tool}-{cache}-{time.strftime('%H%M%S')}"
            raw = (runs.ftkit("torch", s, model, folder, run_dir, args.ftkit_set, args.timeout, max_rss_bytes=cap, work=work)
                   if tool == "ftkit" else runs.baseline("torch", s, model, data, run_dir, args.timeout, max_rss_bytes=cap, work=work))
            if "error" in raw:
                row = _row(tool, raw, rows=n, cache=cache)
            else:
                row = {"tool": TOOLS[tool], "rows": n, "cache": cache, "file_mib": (folder / "train.jsonl").stat().st_size / 2**20,
                       "peak_rss_mib": raw["peak_rss_bytes"] / 2**20, "to_first_step_s": raw["start"] - raw["process_start"],
                       "wall_s": raw["wall_s"]}
            out.append(row)
            say(f"  {row}")
    return out


def batch_size(args, work: Path, say) -> list[dict]:
    model = models.resolve("smollm2", work, args.model)
    out = []
    for b in [int(x) for x in args.sizes.split(",")]:
        s = Settings(steps=args.steps or 4, batch_size=b)
        data = datasets.build("wikisql", work, model, s.examples, 0, s.max_seq_length)
        for tool in args.tools.split(","):
            say(f"batch-size {b}: {tool} ...")
            r = _run(tool, s, model, data, work / "runs" / f"batch{b}-{tool}-{time.strftime('%H%M%S')}", args)
            row = _row(tool, r, batch_size=b)
            if "error" not in row:
                row["s_per_step"] = r["train_s"] / s.steps
            out.append(row)
            say(f"  {row}")
    return out


COLUMNS = {
    "seq-len": [("length", "tokens/row", "{:,}"), ("tool", "tool", "{}"), ("s_per_step", "s/step", "{:.2f}"),
                ("s_per_1k_tokens", "s per 1k tokens", "{:.2f}"), ("tokens_per_s", "trained tok/s", "{:,.0f}"),
                ("peak_rss_mib", "peak RSS MiB", "{:,.0f}")],
    "data-size": [("rows", "rows", "{:,}"), ("tool", "tool", "{}"), ("cache", "token cache", "{}"), ("file_mib", "file MiB", "{:.1f}"),
                  ("to_first_step_s", "to first step s", "{:.1f}"), ("wall_s", "wall s", "{:.1f}"), ("peak_rss_mib", "peak RSS MiB", "{:,.0f}")],
    "batch-size": [("batch_size", "batch", "{}"), ("tool", "tool", "{}"), ("s_per_step", "s/step", "{:.2f}"),
                   ("tokens_per_s", "trained tok/s", "{:,.0f}"), ("peak_rss_mib", "peak RSS MiB", "{:,.0f}"), ("final_loss", "final loss", "{:.4f}")],
}


def render(kind: str, rows: list[dict], markdown: bool) -> str:
    cols = COLUMNS[kind] + [("error", "note", "{}")]
    body = [[fmt.format(r[k]) if r.get(k) is not None else "" for k, _, fmt in cols] for r in rows]
    heads = [h for _, h, _ in cols]
    if markdown:
        return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * 2 + "---:|" * (len(cols) - 2)] +
                         ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(heads)]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [heads, *body])


def main(argv: list[str] | None = None) -> int:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("kind", choices=[*COLUMNS, "all"])
    ap.add_argument("--lengths", default="256,512,1024,2048,4096")
    ap.add_argument("--sizes", help="rows (data-size) or micro-batch sizes (batch-size)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (seq-len and batch-size: 4)")
    ap.add_argument("--tools", help="comma-separated: ftkit, trainer (default: ftkit,trainer; data-size: ftkit)")
    ap.add_argument("--model", type=Path, help="model folder for seq-len and batch-size (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--ftkit-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--max-memory-gib", type=float, default=round(0.8 * psutil.virtual_memory().available / 2**30, 1))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-scaling")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    process.exit_on_sigterm()
    work = args.work_dir = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(f"[scaling] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    kinds = list(COLUMNS) if args.kind == "all" else [args.kind]
    report = {"command": "python bench/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "max_memory_gib": args.max_memory_gib, "ftkit_sets": ftkit_sets(Settings(), args.ftkit_set)}
    text = []
    for kind in kinds:
        a = argparse.Namespace(**vars(args))
        a.tools = args.tools or ("ftkit" if kind == "data-size" else "ftkit,trainer")
        a.sizes = args.sizes or {"data-size": "1000,10000,100000,1000000", "batch-size": "1,2,4,8,16"}.get(kind)
        rows = {"seq-len": seq_len, "data-size": data_size, "batch-size": batch_size}[kind](a, work, say)
        report[kind] = rows
        text.append(f"{kind}\n\n{render(kind, rows, args.markdown)}\n")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print("\n".join(text), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
