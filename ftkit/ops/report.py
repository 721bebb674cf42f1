"""`ftkit report RUN_DIR`: one self-contained HTML page about a run.

Everything comes from the run folder (metrics.jsonl, recipe.toml, final_state.json, the adapter's
ftkit.json, checkpoints/): loss curves, learning rate, throughput and MFU, gradient norm, memory, every
validation metric, the recipe, the hardware and switches, and timings. The plots are inline SVG drawn
by matplotlib (text as paths), the style is inline: the page fetches nothing and opens offline.
"""

from __future__ import annotations

import html
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import tomllib

from ftkit.common.atomic import write_text_atomic
from ftkit.common.errors import FtkitError
from ftkit.train.metrics import FILENAME, MetricsLog
from ftkit.train.tracking import numeric

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 12px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.sub{color:#5b6475;margin:0 0 16px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 12px}
.card b{display:block;font-size:20px}.card span{color:#5b6475;font-size:13px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:8px}
figure svg{width:100%;height:auto;display:block}figcaption{color:#5b6475;font-size:13px;padding:2px 6px}
table{border-collapse:collapse;background:#fff;width:100%;font-size:14px}
th,td{border:1px solid #dde1e7;padding:4px 8px;text-align:left}th{background:#eef1f5}
td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px;overflow:auto;font-size:13px}
.kv td:first-child{width:30%;color:#5b6475}
"""


def _svg(series: list[tuple[str, list[tuple[float, float]], str]], ylabel: str, logy: bool = False) -> str:
    """A line chart as an inline <svg> element; series are (label, points, style)."""
    import matplotlib  # lazy: slow to import
    from matplotlib.backends.backend_svg import FigureCanvasSVG  # lazy: slow to import
    from matplotlib.figure import Figure  # lazy: slow to import

    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "ftkit"}):  # no font files, stable output
        fig = Figure(figsize=(6.4, 3.4), dpi=100)
        FigureCanvasSVG(fig)
        ax = fig.add_subplot()
        for label, pts, style in series:
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=label, linewidth=1.4, markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{_fmt(r[c])}</td>' if isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) else f"<td>{_fmt(r.get(c, ''))}</td>"
                         for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(d: dict[str, Any]) -> str:
    return '<table class="kv">' + "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in d.items()) + "</table>"


def _recipe(path: Path) -> tuple[str, dict[str, Any]]:
    """The run's recipe.toml, as text to show and as data; both empty when the run has none."""
    if not path.exists():
        return "", {}
    text = path.read_text(encoding="utf-8")  # TOML is UTF-8 whatever the locale says
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FtkitError(f"{path}: not valid TOML ({e}); ftkit train writes it: rerun the run, or fix or remove the file.") from None


def build(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    path = run_dir / FILENAME
    if not path.exists():
        stages = sorted(p.parent.name for p in run_dir.glob(f"*/{FILENAME}"))
        hint = f" It holds these runs: {', '.join(stages)}; report each." if stages else ""
        raise FtkitError(f"{run_dir}: no {FILENAME}; point ftkit report at a run folder (output.dir of a recipe).{hint}")
    records = MetricsLog.read(path)
    runs = [r for r in records if r.get("kind") == "run"]
    train = [r for r in records if r.get("kind") == "train"]
    valid = [r for r in records if r.get("kind") == "valid"]
    others = sorted({r.get("kind") for r in records} - {"run", "train", "valid", None})
    run = runs[-1] if runs else {}
    recipe_text, recipe = _recipe(run_dir / "recipe.toml")
    final = json.loads((run_dir / "final_state.json").read_text()) if (run_dir / "final_state.json").exists() else None
    meta_path = run_dir / "adapter" / "ftkit.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    name = recipe.get("name", run_dir.name)
    method = recipe.get("method", {}).get("kind", meta.get("method", "?"))
    model = recipe.get("model", {}).get("path", meta.get("base_model", {}).get("path", "?"))
    total = meta.get("total_steps") or (final or {}).get("step")
    last_step = max((r.get("step", 0) for r in train + valid), default=0)
    status = "finished" if final else f"stopped at step {last_step}" + (f" of {total}" if total else "")

    def pts(rows, key):
        return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get("step") is not None]

    plots = []
    plots.append(("loss", "Loss: training (line) and validation (markers)",
                  _svg([("train", pts(train, "loss"), "-"), ("valid", pts(valid, "loss"), "o-")], "loss")))
    if pts(train, "lr"):
        plots.append(("lr", "Learning rate", _svg([("lr", pts(train, "lr"), "-")], "learning rate")))
    if pts(train, "tokens_per_sec"):
        plots.append(("throughput", "Training throughput (tokens/s, validation time excluded)",
                      _svg([("tokens/s", pts(train, "tokens_per_sec"), "-")], "tokens / s")))
    if pts(train, "mfu"):
        plots.append(("mfu", f"Model FLOPs utilization: achieved model FLOP/s as % of the peak ({run.get('peak_source', '?')})",
                      _svg([("MFU %", [(x, 100 * y) for x, y in pts(train, "mfu")], "-")], "MFU (%)")))
    elif pts(train, "flops_per_sec"):
        plots.append(("flops", "Achieved model FLOP/s", _svg([("FLOP/s", pts(train, "flops_per_sec"), "-")], "FLOP / s")))
    if pts(train, "rewards/accuracies"):  # a preference objective (DPO, ORPO): TRL's reward metrics
        plots.append(("rewards", "Preference, training: reward accuracy (share of pairs whose chosen gains more) and margin",
                      _svg([("accuracy", pts(train, "rewards/accuracies"), "-"), ("margin", pts(train, "rewards/margins"), "-")], "reward")))
    if pts(train, "grad_norm"):
        plots.append(("grad-norm", "Gradient norm (before clipping)", _svg([("grad norm", pts(train, "grad_norm"), "-")], "grad norm")))
    if pts(train, "peak_memory_gib"):
        plots.append(("memory", "Peak accelerator memory", _svg([("GiB", pts(train, "peak_memory_gib"), "-")], "GiB")))

    # Every other number a validation carries, nested per-task ones too (tasks/banking77/accuracy).
    flat_valid = [{"step": r.get("step"), **{k.split("/", 1)[1]: v for k, v in numeric(r).items()}} for r in valid]
    metric_keys = sorted({k for r in flat_valid for k in r} - {"step", "elapsed", "loss"})
    for key in metric_keys:
        plots.append((f"valid-{key.replace('/', '-')}", f"Validation {key}", _svg([(key, pts(flat_valid, key), "o-")], key)))

    tps = [r["tokens_per_sec"] for r in train if isinstance(r.get("tokens_per_sec"), (int, float))]
    mfu = [r["mfu"] for r in train if isinstance(r.get("mfu"), (int, float))]
    elapsed = (final or {}).get("elapsed") or max((r.get("elapsed", 0) for r in train + valid), default=None)
    cards = {
        "status": status,
        "steps": f"{last_step:,}" + (f" / {total:,}" if total else ""),
        "validation loss": (f"{valid[0]['loss']:.4f} → {valid[-1]['loss']:.4f}" if valid else "-"),
        "last training loss": f"{train[-1]['loss']:.4f}" if train else "-",
        "trained tokens": f"{(final or train[-1] if train else {}).get('trained_tokens', 0):,}" if train else "-",
        "training time": _duration(elapsed),
        "median tokens/s": f"{statistics.median(tps):,.0f}" if tps else "-",
        "median MFU": f"{100 * statistics.median(mfu):.2f}%" if mfu else "-",
        "peak memory": f"{max(r['peak_memory_gib'] for r in train if 'peak_memory_gib' in r):.2f} GiB"
        if any("peak_memory_gib" in r for r in train) else "-",
    }
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ftkit run: {html.escape(name)}</title>",
             f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><style>{_CSS}</style></head><body><main>",
             f"<h1>{html.escape(name)}</h1>",
             f"<p class=\"sub\">{html.escape(method)} on {html.escape(str(model))} · {html.escape(str(run.get('backend', '?')))} · "
             f"{html.escape(str(run.get('device', '?')))} · {html.escape(str(run_dir))}</p>",
             '<section class="cards" id="summary">' + "".join(f'<div class="card"><span>{html.escape(k)}</span><b>{html.escape(v)}</b></div>'
                                                               for k, v in cards.items()) + "</section>",
             '<h2>Curves</h2><section class="plots">']
    parts += [f'<figure id="plot-{pid}" class="plot">{svg}<figcaption>{html.escape(cap)}</figcaption></figure>' for pid, cap, svg in plots]
    parts.append("</section>")
    if valid:
        cols = ["step", "loss", *metric_keys, "elapsed"]
        parts.append('<h2>Evaluations</h2><div id="evals">' + _table(flat_valid, [c for c in cols if any(c in r for r in flat_valid)]) + "</div>")
    for kind in others:
        rows = [r for r in records if r.get("kind") == kind]
        cols = list(dict.fromkeys(k for r in rows for k in r if k not in ("kind", "time")))
        parts.append(f"<h2>{html.escape(str(kind))}</h2>" + _table(rows, cols))
    if train:
        cols = ["step", "loss", "rewards/accuracies", "rewards/margins", "lr", "tokens_per_sec", "flops_per_sec", "mfu", "grad_norm",
                "trained_tokens", "elapsed", "peak_memory_gib"]
        parts.append("<h2>Training log</h2>" + _table(train, [c for c in cols if any(c in r for r in train)]))
    parts.append("<h2>Run</h2>")
    about = {k: v for k, v in run.items() if k not in ("kind", "time", "hardware", "switches") and not isinstance(v, (dict, list))}
    about.update({f"switch: {k}": v for k, v in (run.get("switches") or {}).items()})
    parts.append('<div id="run-info">' + _kv(about) + "</div>")
    hw = run.get("hardware") or {}
    if hw:
        flat = {k: v for k, v in hw.items() if not isinstance(v, (dict, list))}
        flat.update({f"GPU {i}": f"{g.get('name')}, {g.get('memory_gib')} GiB" for i, g in enumerate(hw.get("gpus") or [])})
        flat.update({f"package {k}": v for k, v in (hw.get("packages") or {}).items()})
        parts.append('<h2>Hardware</h2><div id="hardware">' + _kv(flat) + "</div>")
    timings = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(runs[0]["time"])) if runs else "-",
               "last record": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(records[-1]["time"])) if records else "-",
               "training time (excluding restarts' downtime)": _duration(elapsed),
               "seconds per step": f"{elapsed / last_step:.2f}" if elapsed and last_step else "-",
               "processes (restarts included)": len(runs)}
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
    timings["checkpoints kept"] = ", ".join(ckpts) or "-"
    parts.append('<h2>Timings</h2><div id="timings">' + _kv(timings) + "</div>")
    parts.append(f'<h2>Recipe</h2><pre id="recipe">{html.escape(recipe_text or "(no recipe.toml)")}</pre>')
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def write(run_dir: Path, out: Path | None = None) -> Path:

    page = build(run_dir)
    out = Path(out) if out else Path(run_dir) / "report.html"
    write_text_atomic(out, page)
    return out
