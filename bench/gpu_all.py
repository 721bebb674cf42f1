"""Every GPU check of ftkit in one run on one CUDA GPU, under 8 minutes, with one table at the end.

    bash bench/gpu_all.sh                     # on the GPU machine (the wrapper sets PYTHONPATH; see its header)
    bash bench/gpu_all.sh --dry-run           # the same plumbing on a CPU, each part in its smallest form
    bash bench/gpu_all.sh --only gpu_check,fsdp --budget gpu_check=200

Parts, in this order, each a child process with its own time budget (seconds; a part that runs out is
killed with its process group and is a failure; the budgets add up to less than 8 minutes):
  setup      installs the Python packages a bare CUDA image lacks from wheels beside the repo (.whl/,
             bench/wheels/, $FTKIT_WHEELS), each only if it is missing, into a folder put on PYTHONPATH
             (pip --no-index --no-deps --target: no network, the image's packages untouched)
  tests      the suite's GPU-marked tests: pytest -m gpu on the test files that use the marker
  gpu_check  bench/gpu_check.py: QLoRA (nf4, double quant) + paged AdamW 8-bit + bf16 + gradient
             checkpointing on a TinyLlama-1.1B-shaped Llama (tokens/s, MFU, peak GPU memory)
  fsdp       `ftkit launch --nproc-per-node N` (N = the GPUs, at least 1) of the same recipe with
             torch.distributed = "fsdp", on gpu_check's model when that part built it
  speed      bench/speed.py --cuda: ftkit vs Trainer+PEFT, bf16 LoRA on a 1.1B-shaped Llama, 1 repetition
The run goes on after a failed part; the exit status is 1 if any part failed, else 0. --dry-run (or
FTKIT_GPU_DRY_RUN=1) runs gpu_check.py --tiny, speed.py --smoke (torch pair), the FSDP smoke on gloo with
the tiny model, and the GPU tests (which skip without CUDA): it measures nothing, it tests the plumbing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PARTS = ("tests", "gpu_check", "fsdp", "speed")
# Seconds per part on the GPU; they sum to 450, leaving room for start-up and the table inside 8 minutes.
BUDGET_S = {"setup": 35, "tests": 45, "gpu_check": 110, "fsdp": 65, "speed": 195}
DEADLINE_S = 450
KILL_GRACE_S = 5  # after SIGTERM, before SIGKILL: speed.py takes its own children down on SIGTERM
GPU_CHECK_STEPS, FSDP_STEPS, SPEED_STEPS = 30, 10, 20
SPEED_DATASETS = "wikisql,packed"
# SmolLM2's tokenizer (the --cuda profile's) comes from a 98 MB GGUF that cannot travel to an offline GPU
# machine: the same 1.1B shape gets a BPE trained here on the benchmark's text instead.
SPEED_SHAPE = "llama-1b-bpe8192"


@dataclass(frozen=True)
class Need:
    """A package the run needs: importable as `module`, installed from a wheel of `dist` if not."""

    module: str
    dist: str
    min_version: str | None = None
    required: bool = True  # False: a missing one is a note, not a failure


NEEDS = (
    Need("bitsandbytes", "bitsandbytes"),
    Need("liger_kernel", "liger-kernel", required=False),  # fused loss on CUDA; ftkit falls back to its chunked loss
    # ftkit's core needs these, and the nvidia-h200 image has none of them
    Need("pydantic", "pydantic"), Need("pydantic_core", "pydantic-core"), Need("annotated_types", "annotated-types"),
    Need("typing_inspection", "typing-inspection"), Need("tomli_w", "tomli-w"),
    Need("typing_extensions", "typing-extensions", min_version="4.16"),  # what pydantic-core 2.50 asks for
)


@dataclass
class Row:
    part: str
    status: str = "fail"  # pass | fail | timeout
    seconds: float | None = None  # None: a further row of the part above
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    ratio: str = ""
    notes: list[str] = field(default_factory=list)
    log: str | None = None
    tail: str = ""


# ---------------------------------------------------------------- running children


def run(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """`cmd` in its own process group, output appended to `log`; (exit status or None on timeout, seconds)."""
    t0 = time.monotonic()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        if timeout <= 0:
            return None, 0.0
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout), time.monotonic() - t0
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
            return None, time.monotonic() - t0
        except BaseException:
            _kill_group(proc, signal.SIGKILL)
            raise


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this script started for the part, nothing else
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- setup: wheels


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def lacking(need: Need) -> str | None:
    """Why `need` must be installed (missing, or older than its minimum), or None."""
    if importlib.util.find_spec(need.module) is None:
        return "missing"
    if need.min_version:
        try:
            have = importlib.metadata.version(need.dist)
        except importlib.metadata.PackageNotFoundError:
            return None  # importable but unregistered (a source checkout): leave it
        if _version_tuple(have) < _version_tuple(need.min_version):
            return f"{have} < {need.min_version}"
    return None


def find_wheel(dist: str, folders: list[Path]) -> Path | None:
    """The wheel of `dist` in the first folder that holds one (file names spell it with underscores)."""
    stem = re.sub(r"[-_.]+", "_", dist).lower()
    for d in folders:
        found = sorted(p for p in d.glob("*.whl") if p.name.split("-")[0].lower() == stem) if d.is_dir() else []
        if found:
            return found[-1]
    return None


def setup(needs: list[Need], folders: list[Path], site: Path, env: dict, budget: float, deadline: float) -> Row:
    row, t0 = Row("setup"), time.monotonic()
    end = min(t0 + budget, deadline)
    log = site.parent / "logs" / "setup.log"
    row.log = str(log)
    sys.path.insert(0, str(site))  # what an earlier run installed there counts as present
    importlib.invalidate_caches()
    todo, problems = [], []
    for need in needs:
        why = lacking(need)
        if why is None:
            continue
        wheel = find_wheel(need.dist, folders)
        if wheel is not None:
            todo.append((need, wheel, why))
        elif need.required:
            problems.append(f"{need.dist} {why}, no wheel in {', '.join(str(f) for f in folders) or '(no folder)'}")
        else:
            row.notes.append(f"{need.dist} {why}, no wheel (optional)")
    if todo:
        site.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--upgrade", "--target", str(site), *(str(w) for _, w, _ in todo)]
        rc, _ = run(cmd, log, end - time.monotonic(), env)
        if rc != 0:
            problems.append(f"pip install from wheels {'timed out' if rc is None else f'exited {rc}'}")
        else:
            # import them in a fresh interpreter, as the parts will (a wheel for another Python fails here)
            mods = ", ".join(n.module for n, _, _ in todo)
            rc, _ = run([sys.executable, "-c", f"import {mods}"], log, end - time.monotonic(), env)
            if rc != 0:
                problems.append(f"installed {mods} but importing them {'timed out' if rc is None else 'failed'} (see {log})")
            row.notes.append("installed " + ", ".join("-".join(w.name.split("-")[:2]) + ("" if why == "missing" else f" (had {why})")
                                                      for _, w, why in todo))
    row.notes[:0] = problems
    row.status = "fail" if problems else "pass"
    row.seconds = time.monotonic() - t0
    if not todo and not problems:
        row.notes.append("nothing to install")
    return row


# ---------------------------------------------------------------- the parts


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def part_tests(ctx: Context, row: Row) -> None:
    marked = sorted(p for p in (REPO / "tests").glob("test_*.py") if re.search(r"mark\.gpu\b", p.read_text(errors="replace")))
    if not marked:
        row.status, row.notes = "fail", ["no test file uses the gpu marker"]
        return
    xml = ctx.work / "tests.xml"
    rc = ctx.step(row, [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        *(str(p.relative_to(REPO)) for p in marked)])
    if rc is None:
        return
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    skips = []
    if xml.exists():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        skips = [s.get("message", "") for s in ET.parse(xml).getroot().iter("skipped")]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    row.notes.append(f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped "
                     f"in {len(marked)} file(s)")
    if skips:
        row.notes.append(f"skip reason: {skips[0][:80]}")
    # on a GPU the GPU tests must run, not skip: skipping there means CUDA or a package is not seen
    row.status = "pass" if rc == 0 and (passed > 0 or ctx.dry_run and counts["skipped"] > 0) else "fail"


def part_gpu_check(ctx: Context, row: Row) -> None:
    out = ctx.work / "gpu_check.json"
    size = ["--tiny"] if ctx.dry_run else ["--steps", str(GPU_CHECK_STEPS)]
    rc = ctx.step(row, [sys.executable, str(BENCH / "gpu_check.py"), *size, "--json", "--out", str(out), "--work", str(ctx.work / "gpu_check")])
    if rc is None or not out.exists():
        return
    report = json.loads(out.read_text())
    run_ = next((r for r in report["runs"] if r["name"] == "single"), None)
    if run_ is None or "error" in run_:
        row.notes.append((run_ or {}).get("error", "no single-GPU run").strip().splitlines()[-1][:120])
        return
    fill_from_check(row, run_)
    row.notes.append(f"{report['model']['params'] / 1e6:,.1f}M params, {run_['steps']} steps, {report['device']}")
    row.notes += [n for n in report["notes"] if not n.startswith("FSDP skipped")]  # the fsdp part runs it
    row.status = "pass" if rc == 0 else "fail"


def fill_from_check(row: Row, r: dict) -> None:
    row.tokens_per_s, row.mfu, row.peak_gib = r["tokens_per_sec"], r["mfu"], r["peak_memory_gib"]
    own = own_mfu(Path(r["run_dir"]) / "metrics.jsonl", r["warmup_steps_excluded"])
    if own is not None:
        row.notes.append(f"ftkit's own MFU {100 * own:.1f}%")
    row.notes.append(f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    if r["config"].get("optimizer_note"):
        row.notes.append(r["config"]["optimizer_note"])


def own_mfu(metrics: Path, warmup: int) -> float | None:
    """The mean of ftkit's per-window `mfu` (its FLOP count for the method, over the peak it found) after warm-up."""
    recs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    vals = [r["mfu"] for r in recs if r.get("kind") == "train" and r["step"] > warmup and r.get("mfu") is not None]
    return sum(vals) / len(vals) if vals else None


def part_fsdp(ctx: Context, row: Row) -> None:
    out = ctx.work / "fsdp.json"
    procs = ctx.fsdp_procs or (1 if ctx.dry_run else max(1, ctx.gpus))
    rc = ctx.step(row, [sys.executable, str(Path(__file__)), "_fsdp", "--work", str(ctx.work), "--out", str(out),
                        "--procs", str(procs), *(["--tiny"] if ctx.dry_run else [])])
    if rc is None or not out.exists():
        return
    res = json.loads(out.read_text())
    r = res["run"]
    if "error" in r:
        row.notes.append(r["error"].strip().splitlines()[-1][:120])
        return
    fill_from_check(row, r)
    row.notes.insert(0, f"{res['processes']} process(es): {res['distributed']}")
    single = ctx.rows.get("gpu_check")
    if single and single.tokens_per_s and r["tokens_per_sec"]:
        row.ratio = f"{r['tokens_per_sec'] / single.tokens_per_s:.2f}x tok/s (fsdp/single)"
    if res["processes"] == 1 and "not wrapped" in res["distributed"]:
        row.notes.append("ftkit shards only with more than one process: this checks launch and the recipe, not sharding")
    row.status = "pass" if rc == 0 else "fail"


def part_speed(ctx: Context, rows: list[Row]) -> None:
    row = rows[0]
    out = ctx.work / "speed.json"
    if ctx.dry_run:
        args = ["--smoke", "--pairs", "torch"]
    else:
        model = ctx.speed_model
        if model is None:
            path = ctx.work / "speed-model.txt"
            if ctx.step(row, [sys.executable, str(Path(__file__)), "_speed-model", str(ctx.work / "speed"), str(path)]) != 0:
                return
            model = Path(path.read_text().strip())
        args = ["--cuda", "--pairs", "torch", "--torch-model", str(model), "--reps", "1",
                "--datasets", SPEED_DATASETS, "--steps", str(SPEED_STEPS)]
    rc = ctx.step(row, [sys.executable, str(BENCH / "speed.py"), *args, "--work", str(ctx.work / "speed"), "--json", "--out", str(out),
                        "--timeout", f"{max(1.0, ctx.left(row)):.0f}"])
    if rc is None or not out.exists():
        return
    rows[:] = speed_rows(json.loads(out.read_text()), rc, row)


def speed_rows(report: dict, rc: int, first: Row) -> list[Row]:
    """One row per data set of speed.py's torch pair (`first` becomes the first): ftkit's figures, the ratios."""
    table = [r for r in report["table"] if r["pair"] == "torch"]
    runs = [r for r in report["runs"] if "error" not in r]
    if not table:
        first.notes.append("speed.py reported no torch pair")
        return [first]
    rows = []
    for data in dict.fromkeys(r["data"] for r in table):
        ours, theirs, ratio = (next(r for r in table if r["data"] == data and r["tool"] == t)
                               for t in ("ftkit torch", "Trainer+PEFT", "ftkit / baseline"))
        mem = {t: max((r.get("peak_gpu_memory_gib") or 0 for r in runs if (r["data"], r["tool"]) == (data, t)), default=0) or None
               for t in ("ftkit torch", "Trainer+PEFT")}
        r = first if not rows else Row("speed", log=first.log)  # its seconds are the first row's
        r.part = f"speed {data}"
        r.tokens_per_s, r.mfu, r.peak_gib = ours["tokens_per_s"], ours.get("peak_fraction"), mem["ftkit torch"]
        r.ratio = "n/a" if ratio["tokens_per_s"] is None else f"{ratio['tokens_per_s']:.2f}x tok/s"
        if mem["ftkit torch"] and mem["Trainer+PEFT"]:
            r.ratio += f", {mem['ftkit torch'] / mem['Trainer+PEFT']:.2f}x mem"
        r.ratio += " (ftkit/Trainer)" if r.ratio != "n/a" else ""
        trainer = "failed" if theirs["tokens_per_s"] is None else f"{theirs['tokens_per_s']:,.0f} tok/s"
        if theirs.get("peak_fraction") is not None:
            trainer += f", {100 * theirs['peak_fraction']:.1f}% of GEMM peak"
        r.notes.append(f"Trainer+PEFT {trainer}" + (f", {mem['Trainer+PEFT']:.2f} GiB" if mem["Trainer+PEFT"] else ""))
        if ours.get("gemm_peak"):
            r.notes.append(f"MFU here: of the {ours['gemm_peak'] / 1e12:,.3g} TFLOP/s GEMM peak speed.py measured")
        r.status = "pass" if ours["tokens_per_s"] is not None and theirs["tokens_per_s"] is not None else "fail"
        rows.append(r)
    if rc != 0 and all(r.status == "pass" for r in rows):  # it failed somewhere the table does not show (step noted the exit)
        first.status = "fail"
    return rows


# ---------------------------------------------------------------- the run


@dataclass
class Context:
    work: Path
    env: dict
    dry_run: bool
    deadline: float
    budgets: dict
    gpus: int
    fsdp_procs: int | None
    speed_model: Path | None = None
    rows: dict = field(default_factory=dict)
    _started: float = 0.0

    def left(self, row: Row) -> float:
        return min(self.budgets[row.part.split()[0]] - (time.monotonic() - self._started), self.deadline - time.monotonic())

    def step(self, row: Row, cmd: list[str]) -> int | None:
        """One command of the part, within what is left of its budget; None (and the row marked) on timeout."""
        log = self.work / "logs" / f"{row.part}.log"
        row.log = str(log)
        limit = self.left(row)
        rc, _ = run(cmd, log, limit, self.env)
        if rc is None:
            row.status = "timeout"
            row.notes.append(f"killed after {limit:.0f} s (budget {self.budgets[row.part.split()[0]]:.0f} s)" if limit > 0
                             else "no time left before the deadline")
        elif rc != 0:
            row.notes.append(f"exit {rc}")
        return rc


def run_part(ctx: Context, name: str) -> list[Row]:
    row = Row(name)
    rows = [row]
    ctx._started = time.monotonic()
    try:
        {"tests": part_tests, "gpu_check": part_gpu_check, "fsdp": part_fsdp}[name](ctx, row) if name != "speed" else part_speed(ctx, rows)
    except Exception as e:  # noqa: BLE001 -- a report that does not parse is this part's failure, not the run's end
        row.status = "fail"
        row.notes.append(f"reading its result: {type(e).__name__}: {e}")
    row.seconds = time.monotonic() - ctx._started
    if row.status != "pass" and row.log:
        row.tail = tail(Path(row.log))
    ctx.rows[name] = row
    return rows


def fmt_table(rows: list[Row]) -> str:
    heads = ("part", "result", "s", "tokens/s", "MFU", "peak GiB", "ratio", "notes")
    num = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    body = [(r.part, r.status, num(r.seconds, ".0f"), num(r.tokens_per_s, ",.0f"), "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
             num(r.peak_gib, ".2f"), r.ratio or "-", "; ".join(r.notes)) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads[:-1])]
    line = lambda cols: "  ".join([c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))] + [cols[-1]])  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths] + ["-----"]), *(line(b) for b in body)])


def device() -> tuple[str, int]:
    if not shutil.which("nvidia-smi"):
        return "no nvidia-smi (CPU)", 0
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True, check=False)
    gpus = [line.strip() for line in q.stdout.splitlines() if line.strip()]
    return (" + ".join(gpus) or "nvidia-smi lists no GPU"), len(gpus)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("FTKIT_GPU_DRY_RUN", "") not in ("", "0"),
                    help="each part in its smallest CPU form (also FTKIT_GPU_DRY_RUN=1)")
    ap.add_argument("--only", help=f"comma-separated parts to run (setup always runs): {', '.join(PARTS)}")
    ap.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="a part's time budget")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole run (default %(default)s)")
    ap.add_argument("--wheels", action="append", type=Path, help="folder of wheels (repeatable; default .whl/, bench/wheels/, $FTKIT_WHEELS)")
    ap.add_argument("--require", action="append", default=[], metavar="MODULE[=DIST]", help="one more package the run needs")
    ap.add_argument("--fsdp-procs", type=int, help="processes of the FSDP smoke (default: the GPUs, 1 in a dry run)")
    ap.add_argument("--speed-model", type=Path, help="model folder for the speed part (default: a 1.1B-shaped Llama built there)")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temp folder)")
    ap.add_argument("--out", type=Path, help="also write the JSON report here (it is always in the work folder)")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    start = time.monotonic()
    only = args.only.split(",") if args.only else list(PARTS)
    budgets = dict(BUDGET_S)
    for item in args.budget:
        name, _, secs = item.partition("=")
        budgets[name] = float(secs)
    for name in [*only, *budgets]:
        if name not in ("setup", *PARTS):
            raise SystemExit(f"gpu_all: unknown part {name!r}; choose from setup, {', '.join(PARTS)}")
    work = (args.work or Path(tempfile.mkdtemp(prefix="ftkit-gpu-all-"))).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    folders = args.wheels or [p for p in (REPO / ".whl", BENCH / "wheels", Path(os.environ.get("FTKIT_WHEELS", ""))) if str(p) not in ("", ".")]
    needs = [*NEEDS, *(Need(m, d or m) for m, _, d in (r.partition("=") for r in args.require))]
    site = work / "site"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), str(REPO), str(REPO / "backends" / "torch"), os.environ.get("PYTHONPATH", "")) if p)}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU forms, even on a GPU machine
    name, gpus = device()
    deadline = start + args.deadline
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"[gpu_all] {'dry run on the CPU' if args.dry_run else name}; work folder {work}; parts {', '.join(only)}", flush=True)

    rows = [setup(needs, folders, site, env, budgets["setup"], deadline)]
    print(f"[gpu_all] setup: {rows[0].status} ({'; '.join(rows[0].notes)})", flush=True)
    ctx = Context(work, env, args.dry_run, deadline, budgets, 0 if args.dry_run else gpus, args.fsdp_procs,
                  args.speed_model and args.speed_model.resolve())
    for part in PARTS:
        if part in only:
            print(f"[gpu_all] {part} (budget {budgets[part]:.0f} s) ...", flush=True)
            rows += run_part(ctx, part)
            print(f"[gpu_all] {part}: {ctx.rows[part].status} in {ctx.rows[part].seconds:.0f} s", flush=True)
    total = time.monotonic() - start
    ok = all(r.status == "pass" for r in rows)
    report = {"dry_run": args.dry_run, "device": name, "gpus": gpus, "python": sys.version.split()[0],
              "torch": _version("torch"), "seconds": total, "deadline_s": args.deadline, "load_average_before": load,
              "load_average_after": Path("/proc/loadavg").read_text().split()[:3] if load else [],
              "ok": ok, "rows": [asdict(r) for r in rows], "work": str(work)}
    for path in (work / "gpu_all.json", args.out):
        if path:
            path.write_text(json.dumps(report, indent=1) + "\n")
    for r in rows:
        if r.status != "pass" and r.tail:
            print(f"\n--- {r.part} ({r.status}), end of {r.log}:\n{r.tail}")
    print(f"\nftkit GPU run: {name}, torch {report['torch']}, {total:.0f} s of {args.deadline:.0f}"
          f"{' (DRY RUN: CPU forms, figures mean nothing)' if args.dry_run else ''}; load average {' '.join(load)} before, "
          f"{' '.join(report['load_average_after'])} after")
    print(fmt_table(rows))
    print(f"{'all parts passed' if ok else 'FAILED: ' + ', '.join(r.part for r in rows if r.status != 'pass')}; "
          f"MFU: gpu_check.py's (6N + 12LdT FLOPs per token over the GPU's dense bf16 spec), on speed rows speed.py's "
          f"(LoRA's FLOPs over its measured GEMM peak); "
          f"report {work / 'gpu_all.json'}")
    return 0 if ok else 1


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- helpers run as children of the parts


def fsdp_main(argv: list[str]) -> int:
    """The FSDP smoke: gpu_check's recipe under `ftkit launch` with torch.distributed = fsdp; JSON to --out."""
    ap = argparse.ArgumentParser(prog="gpu_all.py _fsdp")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    gc = gpu_check_module()
    s = dict(gc.TINY if args.tiny else gc.FULL)
    s["steps"] = s["steps"] if args.tiny else FSDP_STEPS
    s["warmup"] = min(s["warmup"], s["steps"] - 2)
    check, work = args.work / "gpu_check", args.work / "fsdp"
    work.mkdir(parents=True, exist_ok=True)
    report = args.work / "gpu_check.json"
    if report.exists() and (check / "model" / "config.json").exists():  # the gpu_check part built them
        shape, model, data = json.loads(report.read_text())["model"], check / "model", check / "data"
    else:
        shape, model, data = gc.build_model(work / "model", s), work / "model", work / "data"
        gc.pack_data(data, model, s["seq"])
    recipe = gc.write_recipe(work, model, data, s)
    cmd = ["launch", str(recipe), "--nproc-per-node", str(args.procs), "--main-port", str(free_port()), "--backend", "torch",
           "--set", "torch.distributed=fsdp"]
    try:
        run_dir, stderr = gc.run_ftkit("fsdp", cmd, work / "run-fsdp", work)
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        names = [g.get("name", "") for g in first.get("hardware", {}).get("gpus", [])]
        peak = next((v for k, v in gc.PEAK_TFLOPS if names and k in names[0]), None)
        res = {"run": gc.summarise("fsdp", args.procs, run_dir, stderr, s, shape, peak), "processes": first.get("processes"),
               "distributed": first.get("switches", {}).get("distributed"), "device": names[0] if names else "cpu", "peak_tflops": peak}
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        res = {"run": {"error": str(e)}, "processes": args.procs, "distributed": None}
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 1 if "error" in res["run"] else 0


def speed_model_main(argv: list[str]) -> int:
    """Build the speed part's model (TinyLlama-1.1B's shape, a BPE of the benchmark's text) into a work folder."""
    work, out = Path(argv[0]), Path(argv[1])
    sys.path.insert(0, str(BENCH))
    from harness import models

    models.SHAPES.setdefault(SPEED_SHAPE, {**models.SHAPES["llama-1b"], "tokenizer": "bpe-8192"})
    out.write_text(str(models.config_llama(SPEED_SHAPE, work)) + "\n")
    return 0


if __name__ == "__main__":
    helpers = {"_fsdp": fsdp_main, "_speed-model": speed_model_main}
    if len(sys.argv) > 1 and sys.argv[1] in helpers:
        sys.exit(helpers[sys.argv[1]](sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
