"""A DPO step's cost: ftkit's torch DPO step against its own SFT step on the same tokens (the unit), and against
TRL's DPOTrainer + PEFT on the same model, pairs, batch and steps.

    python bench/dpo_speed.py                          # SmolLM2-135M-Instruct (models/, from ./scripts/quickstart)
    python bench/dpo_speed.py --model DIR --steps 6 --batch 4

Each tool runs in its own child process (so that its peak resident memory, getrusage's maxrss, is its own): LoRA
r8 / alpha 16 on every linear layer, AdamW at a constant LR with clipping at 1.0, fp32, no gradient checkpointing,
no dropout, the first `batch x steps` pairs of data/commonsenseqa_pairs, the reference the base with the adapter
off. A step = `batch` pairs = 2 x batch sequences; the first step is a warm-up and is not timed. tokens/s counts
every non-pad token of the step's sequences (prompt and response, chosen and rejected) over the timed steps (wall
time, and the process's CPU time, which other load on a shared machine disturbs less). The
SFT row trains the same 2 x batch sequences, with the same response masks, as one plain SFT step. Timings on a
shared machine are noisy: the load average is printed with every row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from harness import process  # noqa: E402

PAIRS = REPO / "data" / "commonsenseqa_pairs" / "train.jsonl"
TOOLS = ("ftkit-sft", "ftkit-dpo", "trl-dpo")
LR = 2e-4


def cpu_s() -> float:
    """This process's CPU seconds (all its threads): less sensitive to other load on the machine than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in process.loadavg())


def rows(n: int) -> list[dict]:
    lines = PAIRS.read_text().splitlines()[:n]
    return [{k: json.loads(line)[k] for k in ("prompt", "chosen", "rejected")} for line in lines]


def ftkit_child(tool: str, model: Path, steps: int, batch: int) -> dict:
    import numpy as np

    from ftkit.adapters import init
    from ftkit.backend.registry import get_backend
    from ftkit.data.batch import make_batch
    from ftkit.data.pairs import pair_micro_batches
    from ftkit.data.preference import encode_pair, sequences
    from ftkit.models.tokenizer import load_tokenizer
    from ftkit.recipe.load import build_recipe

    body = {"model": {"path": str(model)}, "data": {"path": "-", "max_seq_length": 512},
            "method": {"kind": "lora", "rank": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
            "train": {"objective": "dpo", "beta": 0.1, "seed": 0, "lr": LR, "optimizer": "adamw", "max_grad_norm": 1.0},
            "torch": {"precision": "fp32", "gradient_checkpointing": False}}
    recipe = build_recipe(body, "bench", check_paths=False)
    tok = load_tokenizer(model)
    pairs = [encode_pair(r, tok, recipe.data).pair for r in rows(batch * (steps + 1))]
    be = get_backend("torch")
    be.load(recipe, model, adapter=None, train=True)
    be.set_adapter_tensors(init.draw(be.adapter_tensors(), 0))
    be.set_reference(None)
    be.start_training()
    times, cpus, tokens = [], [], 0
    for i in range(steps + 1):
        chunk = pairs[i * batch : (i + 1) * batch]
        t, c = time.perf_counter(), cpu_s()
        if tool == "ftkit-dpo":
            (pb,) = pair_micro_batches(chunk, batch, tok.pad_token_id, False)
            loss = be.pair_forward_backward(pb, 1.0 / batch)["loss"]
        else:
            b = make_batch(sequences(chunk), tok.pad_token_id)
            loss = be.forward_backward(b, 1.0 / b.n_targets)
        be.optimizer_step(LR)
        float(loss)  # the step is done on the host's side too
        if i:
            times.append(time.perf_counter() - t)
            cpus.append(cpu_s() - c)
            tokens += sum(len(s.ids) for s in sequences(chunk))
    return {"train_s": sum(times), "cpu_s": sum(cpus), "tokens": tokens, "median_step_s": float(np.median(times))}


def trl_child(model: Path, steps: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class InOrder(DPOTrainer):  # the rows in file order: each step holds the pairs ftkit's step holds
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    marks: list[tuple[float, float]] = []  # (wall, cpu) at each step's start and end

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks.append((time.perf_counter(), cpu_s()))

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), cpu_s()))

    tokenizer = AutoTokenizer.from_pretrained(model)
    out = tempfile.mkdtemp(prefix="dpo-speed-trl-")  # TRL writes nothing there with save_strategy "no"; removed after
    args = DPOConfig(output_dir=out, learning_rate=LR, lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", per_device_train_batch_size=batch,
                     max_steps=steps + 1, bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1, report_to=[],
                     save_strategy="no", seed=0, use_cpu=True, disable_tqdm=True, beta=0.1, max_length=512)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = InOrder(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=args,
                      train_dataset=Dataset.from_list(rows(batch * (steps + 1))), processing_class=tokenizer,
                      peft_config=lora, callbacks=[Clock()])
    seqs = [len(r["prompt_ids"]) + len(r[k]) for r in trainer.train_dataset for k in ("chosen_ids", "rejected_ids")]
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    times = [end[0] - start[0] for start, end in zip(marks[0::2], marks[1::2])][1:]
    cpus = [end[1] - start[1] for start, end in zip(marks[0::2], marks[1::2])][1:]
    tokens = sum(seqs[2 * batch :])  # the timed steps' sequences
    return {"train_s": sum(times), "cpu_s": sum(cpus), "tokens": tokens, "median_step_s": sorted(times)[len(times) // 2]}


def child(tool: str, model: Path, steps: int, batch: int) -> None:
    before = loadavg()
    out = trl_child(model, steps, batch) if tool == "trl-dpo" else ftkit_child(tool, model, steps, batch)
    out.update(tool=tool, tokens_per_s=out["tokens"] / out["train_s"], tokens_per_cpu_s=out["tokens"] / out["cpu_s"], load=f"{before} -> {loadavg()}",
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4, help="pairs a step")
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.model, a.steps, a.batch)
    env_path = ":".join(str(REPO / p) for p in (".", "backends/torch"))
    results = {}
    for tool in a.tools:
        cmd = [sys.executable, __file__, "--child", tool, "--model", str(a.model), "--steps", str(a.steps), "--batch", str(a.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": env_path})
        if proc.returncode:
            sys.exit(f"{tool} failed:\n{proc.stderr[-3000:]}")
        results[tool] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{a.model.name}: {a.batch} pairs a step, {a.steps} timed steps (after 1 warm-up), fp32, LoRA r8 all-linear")
    print(f"{'tool':10} {'tokens':>6} {'tokens/s':>9} {'tok/CPU s':>9} {'s/step':>7} {'peak RSS MiB':>12}  load average before -> after")
    for r in results.values():
        print(f"{r['tool']:10} {r['tokens']:6d} {r['tokens_per_s']:9.1f} {r['tokens_per_cpu_s']:9.1f} {r['median_step_s']:7.2f} "
              f"{r['peak_rss_mib']:12.0f}  {r['load']}")
    if "ftkit-dpo" in results:
        dpo = results["ftkit-dpo"]
        for other in ("ftkit-sft", "trl-dpo"):
            if other in results:
                print(f"ftkit DPO / {other}: tokens/s x{dpo['tokens_per_s'] / results[other]['tokens_per_s']:.2f}, "
                      f"tokens/CPU s x{dpo['tokens_per_cpu_s'] / results[other]['tokens_per_cpu_s']:.2f}, "
                      f"peak RSS x{dpo['peak_rss_mib'] / results[other]['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
