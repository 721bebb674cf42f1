"""The baseline ftkit's MLX backend is measured against: `mlx_lm lora`, run through mlx-lm's own code.

    python bench/baseline_mlx.py CONFIG.json      # bench/speed.py writes the config and runs this

The arguments are exactly those of an `mlx_lm lora --train -c config.yaml ...` command line, resolved the
way `mlx_lm lora` resolves them (its parser, then the config file's keys, then its defaults), and the run
is mlx-lm's own: `load`, `load_dataset`, `train_model`. The only addition is a training callback that
records when the loop started and ended and the last reported loss (mlx-lm's CLI prints them but writes
no file). Its choices are kept, so what is measured is what a user gets: every batch padded to a
multiple of 32 (plus one), no packing, gradient accumulation as the mean of micro-batch means, no
gradient clipping (the comparison turns ftkit's off too).

Mapping from the shared settings: `--iters` counts micro-batches in mlx-lm, so it is steps * grad_accum;
LoRA `scale` is alpha / rank; `--num-layers -1` and mlx-lm's default keys put LoRA on every linear layer
of every block (ftkit's "all-linear"); AdamW with weight decay 0 (mlx's default is 0.01); the cosine
schedule is `cosine_decay(lr, steps)` over optimizer updates; chat data trains on the assistant turn
with `--mask-prompt`.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import numpy as np
from mlx_lm.lora import CONFIG_DEFAULTS, build_parser, train_model
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import load_dataset
from mlx_lm.utils import load


class Recorder(TrainingCallback):
    def __init__(self, grad_accum: int):
        self.grad_accum = grad_accum
        self.end = None
        self.ends: list[float] = []
        self.reports: list[dict] = []

    def on_train_loss_report(self, info: dict) -> None:
        self.end = time.time()
        self.ends.append(self.end)
        self.reports.append({"step": info["iteration"] // self.grad_accum, "loss": info["train_loss"],
                             "own_trained_tokens": info["trained_tokens"], "peak_memory_gb": info["peak_memory"]})


def mlx_args(cfg: dict, data_dir: Path, adapter_dir: Path) -> types.SimpleNamespace:
    """What `mlx_lm lora` builds from this command line and config file."""
    a = cfg["grad_accum"]
    argv = ["--model", cfg["model"], "--train", "--data", str(data_dir), "--fine-tune-type", "lora", "--optimizer", "adamw",
            "--num-layers", "-1", "--batch-size", str(cfg["batch_size"]), "--iters", str(cfg["steps"] * a),
            "--learning-rate", str(cfg["lr"]), "--steps-per-report", str(cfg["report_every"] * a),
            "--steps-per-eval", str(10**9), "--save-every", str(10**9), "--grad-accumulation-steps", str(a),
            "--max-seq-length", str(cfg["max_seq_length"]), "--seed", str(cfg["seed"]), "--adapter-path", str(adapter_dir)]
    if cfg["format"] == "chat":
        argv.append("--mask-prompt")
    if cfg["gradient_checkpointing"]:
        argv.append("--grad-checkpoint")
    config_file = {  # the -c YAML keys the command line has no flag for
        "lora_parameters": {"rank": cfg["rank"], "scale": cfg["alpha"] / cfg["rank"], "dropout": cfg["dropout"]},
        "optimizer_config": {"adamw": {"weight_decay": cfg["weight_decay"]}},
        **({"lr_schedule": {"name": "cosine_decay", "arguments": [cfg["lr"], cfg["steps"]]}} if cfg["scheduler"] == "cosine" else {}),
    }
    args = vars(build_parser().parse_args(argv))
    for k, v in config_file.items():
        if args.get(k) is None:
            args[k] = v
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    return types.SimpleNamespace(**args)


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    out = Path(cfg["output_dir"])
    if cfg["scheduler"] not in ("cosine", "constant") or cfg["quantize"] != "none":
        raise SystemExit(f"baseline_mlx: scheduler {cfg['scheduler']!r} / quantize {cfg['quantize']!r} is not mapped to mlx_lm lora.")
    args = mlx_args(cfg, Path(cfg["data"]).parent, out / "adapters")
    np.random.seed(args.seed)  # as mlx_lm.lora.run does
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    recorder = Recorder(cfg["grad_accum"])
    start = time.time()
    train_model(args, model, train_set, valid_set, training_callback=recorder)
    last = recorder.reports[-1]
    result = {"start": start, "end": recorder.end, "report_ends": recorder.ends, "steps": last["step"], "final_loss": last["loss"],
              "losses": recorder.reports, "examples": args.iters * args.batch_size, "own_target_tokens": last["own_trained_tokens"]}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
