"""GPU check: QLoRA throughput, peak memory and MFU of ftkit's torch backend on a ~1B Llama.

    python bench/gpu_check.py                  # on a CUDA machine: table on stdout
    python bench/gpu_check.py --json           # one JSON object on stdout instead
    python bench/gpu_check.py --out gpu.json   # table, and the JSON written to a file
    python bench/gpu_check.py --tiny --json    # CPU sanity run (a few-MB model, fp32, a few steps)

Offline: a TinyLlama-1.1B-shaped Llama (hidden 2048, 22 layers, MLP 5632, 32 heads / 4 KV heads, vocab
32000) gets random weights and a byte-level BPE trained here on the bundled data/wikisql text, all saved
under the work folder. The WikiSQL rows are packed into full max-seq-length examples. ftkit itself then
trains it, from a recipe file it writes: LoRA (all linear layers) on an nf4 base (bitsandbytes, double
quantization), optimizer paged_adamw_8bit, bf16 autocast, gradient checkpointing, first in one process
(`ftkit train`) and, with more than one GPU, under FSDP (`ftkit launch --nproc-per-node N`).

Figures, read back from the run's metrics.jsonl (one train record per step):
- tokens/s: non-padding tokens per second of training (all processes together) after the first --warmup-steps steps (these pay for
  CUDA/bitsandbytes warm-up and are left out of the average); validation time is not counted.
- peak memory: `peak_memory_gib` of the train records (torch.cuda.max_memory_allocated of the training
  process), n/a when ftkit does not record it.
- MFU = tokens/s * F / (peak dense bf16 FLOP/s per GPU * GPUs), with model FLOPs per token
  F = 6*N + 12*L*d*T (PaLM's convention): N = base parameters that take part in matmuls (all but the input
  embedding table), L layers, d hidden size, T sequence length. Recompute from gradient checkpointing is
  not counted. With LoRA the frozen base needs no weight gradients (~4N of real work), so this MFU is the
  figure comparable to a full fine-tune's, not the hardware utilisation. Peak FLOP/s comes from a table of
  GPU names (--peak-tflops overrides); an unknown GPU gets MFU n/a.
Random weights make the losses meaningless as quality; they only show the run trained (finite, moving).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
WIKISQL = REPO / "data" / "wikisql"
# dense bf16 tensor-core TFLOP/s, by a piece of torch.cuda.get_device_name(); the first match wins
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
               ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.0)]
FULL = {"hidden": 2048, "layers": 22, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000,
        "tok_vocab": 8192, "seq": 512, "batch": 8, "steps": 30, "warmup": 5, "precision": "bf16"}
TINY = {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": None,
        "tok_vocab": 512, "seq": 64, "batch": 2, "steps": 5, "warmup": 2, "precision": "fp32"}
FORMULA = "MFU = tokens/s * (6*N + 12*L*d*T) / (peak bf16 dense FLOP/s * GPUs), N = matmul params of the base"


def build_tokenizer(dest: Path, vocab_size: int):
    """Byte-level BPE on the WikiSQL training text (as tests/builders.py does; no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (WIKISQL / "train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    fast.save_pretrained(dest)
    return fast


def build_model(dest: Path, s: dict) -> dict:
    """Random-weight Llama of shape `s` with its tokenizer in `dest`; returns the shape and parameter counts."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    tok = build_tokenizer(dest, s["tok_vocab"])
    cfg = LlamaConfig(vocab_size=s["vocab"] or len(tok), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 1B init is quick on a GPU
        model = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    matmul = total - model.get_input_embeddings().weight.numel()
    model.to(torch.bfloat16 if s["precision"] == "bf16" else torch.float32).save_pretrained(dest)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"hidden": s["hidden"], "layers": s["layers"], "intermediate": s["intermediate"], "heads": s["heads"],
            "kv_heads": s["kv_heads"], "vocab": cfg.vocab_size, "params": total, "matmul_params": matmul}


def pack_data(dest: Path, model: Path, seq: int) -> None:
    """WikiSQL rows joined (blank line between) into {"text"} examples of at least `seq` tokens, so every
    training sequence is full (ftkit truncates each to max_seq_length)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    dest.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        rows, cur, n = [], [], 0
        for line in (WIKISQL / f"{split}.jsonl").read_text().splitlines():
            text = json.loads(line)["text"]
            cur.append(text)
            n += len(tok(text + "\n\n").input_ids)
            if n >= seq + seq // 16:  # a margin: tokenizing the joined text may merge across rows
                rows.append("\n\n".join(cur))
                cur, n = [], 0
        (dest / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))


def write_recipe(work: Path, model: Path, data: Path, s: dict) -> Path:
    steps = s["steps"]
    recipe = f"""# written by bench/gpu_check.py
[model]
path = "{model}"
quantize = "nf4"
[method]
kind = "lora"
rank = 16
alpha = 32
targets = "all-linear"
[data]
path = "{data}"
max_seq_length = {s["seq"]}
[train]
iters = {steps}
batch_size = {s["batch"]}
grad_accum = 1
lr = 1e-4
scheduler = "constant"
optimizer = "paged_adamw_8bit"
steps_per_report = 1
steps_per_eval = {steps}
val_batches = 1
save_every = {steps + 1}
eval_before = false
[torch]
precision = "{s["precision"]}"
gradient_checkpointing = true
distributed = "none"
"""
    path = work / "gpu_check.toml"
    path.write_text(recipe)
    return path


def run_ftkit(name: str, args: list[str], run_dir: Path, work: Path) -> tuple[Path, str]:
    """One `python -m ftkit.cli ...` into `run_dir` (replaced if there); its stderr."""
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "backends"), os.environ.get("PYTHONPATH", "")])}
    print(f"[gpu_check] {name}: ftkit {' '.join(args[:1])} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "ftkit.cli", *args, "--set", f"output.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}")
    return run_dir, out.stderr


def summarise(name: str, gpus: int, run_dir: Path, stderr: str, s: dict, shape: dict, peak_tflops: float | None) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = sorted((r for r in recs if r.get("kind") == "train"), key=lambda r: r["step"])
    steady = [(r, r["elapsed"] - p["elapsed"]) for p, r in itertools.pairwise(train) if r["step"] > s["warmup"]]
    seconds = sum(dt for _, dt in steady)
    tps = sum(r["tokens_per_sec"] * dt for r, dt in steady) / seconds if seconds > 0 else None
    mems = [r["peak_memory_gib"] for r in train if r.get("peak_memory_gib") is not None]
    flops_per_token = 6 * shape["matmul_params"] + 12 * shape["layers"] * shape["hidden"] * s["seq"]
    mfu = tps * flops_per_token / (peak_tflops * 1e12 * gpus) if tps and peak_tflops else None
    used = tomllib.loads((run_dir / "recipe.toml").read_text())  # what ftkit resolved and ran
    return {
        "name": name, "gpus": gpus, "steps": len(train), "warmup_steps_excluded": s["warmup"],
        "tokens_per_sec": tps, "tokens_per_sec_per_gpu": tps and tps / gpus, "seconds_per_step": seconds / len(steady) if steady else None,
        "peak_memory_gib": max(mems) if mems else None, "mfu": mfu, "flops_per_token": flops_per_token,
        "loss_first": train[0]["loss"], "loss_last": train[-1]["loss"], "grad_norm_last": train[-1].get("grad_norm"),
        "config": {"quantize": used["model"]["quantize"], "double_quant": used["torch"]["double_quant"],
                   "method": used["method"]["kind"], "rank": used["method"]["rank"], "targets": used["method"]["targets"],
                   "optimizer": used["train"]["optimizer"], "precision": used["torch"]["precision"],
                   "gradient_checkpointing": used["torch"]["gradient_checkpointing"],
                   "distributed": used["torch"]["distributed"], "batch_size": used["train"]["batch_size"],
                   "max_seq_length": used["data"]["max_seq_length"],
                   "optimizer_note": "ran unpaged as adamw_8bit: no CUDA" if "the same update, unpaged" in stderr else None},
        "run_dir": str(run_dir),
    }


def show(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    t = Table(title=f"ftkit QLoRA check on {report['device']} ({report['model']['params'] / 1e6:,.1f}M-param Llama)")
    for col in ("run", "GPUs", "tokens/s", "s/step", "peak mem GiB", "MFU", "loss first -> last"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in report["runs"]:
        if "error" in r:
            t.add_row(r["name"], str(r["gpus"]), "failed", "", "", "", [x.strip("│ ") for x in r["error"].splitlines() if any(c.isalnum() for c in x)][-1][:60])
            continue
        t.add_row(r["name"], str(r["gpus"]), fmt(r["tokens_per_sec"], ",.0f"), fmt(r["seconds_per_step"], ".3f"),
                  fmt(r["peak_memory_gib"], ".2f"), fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else ""),
                  f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    c = next((r["config"] for r in report["runs"] if "config" in r), {})
    console = Console()
    console.print(t)
    console.print(f"{c.get('method')} r{c.get('rank')} {c.get('targets')} on a {c.get('quantize')} base, {c.get('optimizer')}"
                  f"{' (' + c['optimizer_note'] + ')' if c.get('optimizer_note') else ''}, {c.get('precision')}, gradient "
                  f"checkpointing {c.get('gradient_checkpointing')}, batch {c.get('batch_size')} x {c.get('max_seq_length')} tokens")
    console.print(f"tokens/s leaves out the first {report['warmup_steps']} of {report['steps']} steps (warm-up).\n"
                  f"{report['mfu_formula']}; peak {fmt(report['peak_tflops'], '.0f')} TFLOP/s per GPU", highlight=False)
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU sanity run: a few-MB model, fp32, a few steps")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    ap.add_argument("--out", type=Path, help="also write the JSON to this file")
    ap.add_argument("--work", type=Path, help="work folder for model, data and runs (default: a new temp folder)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run")
    ap.add_argument("--warmup-steps", type=int, help="first steps left out of tokens/s")
    ap.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s per GPU, for MFU")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no CUDA GPU: this script measures ftkit's GPU QLoRA path; use --tiny for a CPU sanity run.", file=sys.stderr)
        return 2
    s = dict(TINY if args.tiny else FULL)
    s["steps"] = args.steps or s["steps"]
    s["warmup"] = min(args.warmup_steps if args.warmup_steps is not None else s["warmup"], s["steps"] - 2)
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = args.peak_tflops or (next((v for k, v in PEAK_TFLOPS if k in device), None) if cuda else None)
    work = (args.work or Path(tempfile.mkdtemp(prefix="ftkit-gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"[gpu_check] work folder {work}; building the model and data", file=sys.stderr, flush=True)
    shape = build_model(work / "model", s)
    pack_data(work / "data", work / "model", s["seq"])
    recipe = write_recipe(work, work / "model", work / "data", s)

    runs, notes, gpus = [], [], torch.cuda.device_count() if cuda else 0
    jobs = [("single", 1, ["train", str(recipe), "--backend", "torch", "--json"], work / "run-single")]
    if gpus > 1:
        jobs.append(("fsdp", gpus, ["launch", str(recipe), "--nproc-per-node", str(gpus), "--backend", "torch",
                                    "--set", "torch.distributed=fsdp"], work / "run-fsdp"))
    else:
        notes.append(f"FSDP skipped: {gpus} CUDA GPU(s), it needs more than one")
    for name, n, cmd, run_dir in jobs:
        try:
            runs.append(summarise(name, max(n, 1), *run_ftkit(name, cmd, run_dir, work), s, shape, peak))
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            runs.append({"name": name, "gpus": n, "error": str(e)})
    if peak is None:
        notes.append(f"MFU n/a: no peak FLOP/s known for {device!r} (pass --peak-tflops)")
    if any(r.get("peak_memory_gib") is None for r in runs if "error" not in r):
        notes.append("peak memory n/a: " + ("ftkit's train records carry no peak_memory_gib" if cuda else "CUDA only"))
    report = {"device": device, "gpus": gpus, "torch": torch.__version__, "tiny": args.tiny, "model": shape,
              "steps": s["steps"], "warmup_steps": s["warmup"], "peak_tflops": peak, "mfu_formula": FORMULA,
              "runs": runs, "notes": notes, "work": str(work)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        show(report)
    for r in runs:
        if "error" in r:
            print(f"[gpu_check] {r['name']} failed: {r['error']}", file=sys.stderr)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
