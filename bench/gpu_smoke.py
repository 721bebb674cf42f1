"""Run the torch backend's GPU paths through ftkit and print figures (no hub access needed).

A SmolLM2-135M-shaped Llama (576 hidden, 30 layers, GQA 9/3) is built from a config with random
weights and the test suite's WikiSQL-trained tokenizer, then trained with LoRA, DoRA and full
fine-tuning in bf16 autocast on CUDA. Random weights make the losses meaningless as quality; the
figures are that each path runs on the GPU, its step time, tokens/s and peak memory.

    python bench/gpu_smoke.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def build_model(dest: Path) -> Path:
    import torch
    from builders import build_tokenizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tokenizer(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rope_theta=100000.0, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(dest)
    return dest


def main() -> None:
    import torch

    from ftkit.recipe.load import load_recipes
    from ftkit.train.loop import Trainer
    from ftkit.train.prepare import prepare

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this script checks the GPU paths")
    work = Path(tempfile.mkdtemp())
    model = build_model(work / "model")
    rows = []
    for kind, precision in (("lora", "bf16"), ("dora", "bf16"), ("full", "bf16"), ("lora", "fp32")):
        recipe = work / f"{kind}-{precision}.toml"
        recipe.write_text(
            f'[model]\npath = "{model}"\n[method]\nkind = "{kind}"\nrank = 8\nalpha = 16\n'
            f'[data]\npath = "{REPO / "data" / "wikisql"}"\nmax_seq_length = 512\n'
            f'[train]\niters = {args.steps}\nbatch_size = 8\nlr = {"1e-4" if kind == "full" else "3e-4"}\n'
            f'steps_per_eval = {args.steps}\nval_batches = 4\nsteps_per_report = 5\nsave_every = {args.steps}\n'
            f'[output]\ndir = "{work / f"run-{kind}-{precision}"}"\n[torch]\nprecision = "{precision}"\n'
        )
        (r,) = load_recipes([recipe])
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = Trainer(prepare(r), "torch", quiet=True).run()
        wall = time.perf_counter() - t0
        metrics = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        tps = [m["tokens_per_sec"] for m in metrics if m["kind"] == "train"][1:]  # the first report includes warm-up
        rows.append({
            "method": kind, "precision": precision, "device": result.info["device"],
            "trainable": result.info["trainable_params"], "steps": result.steps,
            "valid_loss": f"{result.first_valid_loss:.3f} -> {result.last_valid_loss:.3f}",
            "median_tokens_per_sec": round(sorted(tps)[len(tps) // 2]) if tps else None,
            "seconds_per_step": round(result.seconds / result.steps, 4), "wall_s": round(wall, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        })
        print(json.dumps(rows[-1]), flush=True)
    print("torch", torch.__version__, torch.cuda.get_device_name(0))


if __name__ == "__main__":
    main()
