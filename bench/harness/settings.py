"""What every tool in a comparison runs with: one `Settings`, turned into each tool's own terms here.

The ftkit side gets its defaults plus only what the comparison needs (same model, data, LoRA, optimizer,
schedule, steps; no validation or checkpoints inside the timed run). New ftkit recipe keys (say
`data.packing`) go in FTKIT_SETS or on the command line (`--ftkit-set data.packing=true`), nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# Extra `--set` overrides for every ftkit run, on top of what `ftkit_recipe` writes (empty: ftkit's defaults).
FTKIT_SETS: list[str] = []


@dataclass(frozen=True)
class Settings:
    steps: int = 8  # optimizer steps
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    scheduler: str = "cosine"  # no warmup: ftkit, Trainer and mlx-lm's cosine_decay then give the same LR every step
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping (mlx_lm lora has none)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    max_seq_length: int = 1024  # above every example's length: no tool truncates
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast, frozen base in bf16, LoRA weights fp32)
    quantize: str = "none"  # none | nf4 (QLoRA through bitsandbytes)
    gradient_checkpointing: bool = False

    @property
    def examples(self) -> int:
        """Examples one run consumes: each example of the benchmark's training file exactly once."""
        return self.steps * self.batch_size * self.grad_accum

    @property
    def report_every(self) -> int:
        """Optimizer steps per loss report: the final loss is the mean over the last such window
        (about the last quarter of the run), as each tool computes it."""
        want = max(1, self.steps // 4)
        return max(w for w in range(1, want + 1) if self.steps % w == 0)

    def with_(self, **changes) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return {**asdict(self), "examples": self.examples, "report_every": self.report_every}


@dataclass(frozen=True)
class Profile:
    name: str
    settings: Settings
    pairs: tuple[str, ...]  # "torch": ftkit torch vs Trainer+PEFT; "mlx": ftkit MLX vs mlx_lm lora
    datasets: dict[str, tuple[str, ...]]  # pair -> the data sets it trains on (all three are built and listed)
    reps: int
    packed_length: int  # tokens per row of the already-packed data set
    torch_model: str  # "smollm2" | "tiny" | "llama-1b"
    mlx_model: str  # "mlx-small" | "tiny"
    notes: list[str] = field(default_factory=list)
    gemm_seconds: float = 2.0  # timing budget of each GEMM-peak measurement (harness.flops), before and after the runs


ALL = ("wikisql", "chat", "packed")
PROFILES = {
    # On this project's 2-core CPU: a real 135M model for torch; MLX runs ~20x slower here, so a small
    # config-built Llama for the MLX pair.
    "cpu": Profile("cpu", Settings(steps=6, batch_size=4), ("torch", "mlx"), {"torch": ALL, "mlx": ALL},
                   reps=3, packed_length=256, torch_model="smollm2", mlx_model="mlx-small"),
    # The test suite's run: a tiny model, 2 steps, one repetition, one data set per pair (each child process pays
    # ~8 s of imports): the chat path through ftkit torch and the Trainer, the text path through ftkit MLX and
    # mlx-lm; all three sets are still built. It exercises every tool, and measures nothing.
    "smoke": Profile("smoke", Settings(steps=2, batch_size=2, grad_accum=2), ("torch", "mlx"),
                     {"torch": ("chat",), "mlx": ("packed",)}, reps=1, packed_length=64, torch_model="tiny", mlx_model="tiny",
                     gemm_seconds=0.2),
    # A CUDA GPU: a TinyLlama-1.1B-shaped Llama (random weights) in bf16; --qlora puts the base in nf4.
    "cuda": Profile("cuda", Settings(steps=30, batch_size=8, grad_accum=2, precision="bf16", max_seq_length=2048),
                    ("torch",), {"torch": ALL, "mlx": ALL}, reps=3, packed_length=1024, torch_model="llama-1b",
                    mlx_model="tiny", notes=["the MLX pair is left out on CUDA (MLX runs on Apple silicon and CPUs); add it with --pairs torch,mlx"]),
}


def ftkit_recipe(s: Settings, model: Path, data: Path, run_dir: Path, backend: str = "torch") -> str:
    """The ftkit recipe for one run: ftkit's defaults plus what the comparison fixes (and only the running
    backend's section, so that ftkit has no other-backend keys to point out)."""
    body = {
        "model": {"path": str(model), "quantize": s.quantize},
        "method": {"kind": "lora", "rank": s.rank, "alpha": s.alpha, "dropout": s.dropout, "targets": "all-linear"},
        "data": {"path": str(data), "max_seq_length": s.max_seq_length, "valid_fraction": 0.0},
        "train": {"iters": s.steps, "batch_size": s.batch_size, "grad_accum": s.grad_accum, "lr": s.lr,
                  "scheduler": s.scheduler, "warmup": 0, "optimizer": "adamw", "weight_decay": s.weight_decay,
                  "seed": s.seed, "steps_per_report": s.report_every,
                  **({"max_grad_norm": s.max_grad_norm} if s.max_grad_norm is not None else {}),
                  # no checkpoint inside the timed run (the baselines save none in this many steps)
                  "save_every": s.steps, "eval_before": False},
        "output": {"dir": str(run_dir)},
        **({"torch": {"precision": s.precision, "gradient_checkpointing": s.gradient_checkpointing}} if backend == "torch" else
           {"mlx": {"gradient_checkpointing": s.gradient_checkpointing}}),
    }
    lines = ["# written by bench/speed.py"]
    for section, values in body.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def ftkit_sets(s: Settings, extra: list[str]) -> list[str]:
    """`--set` arguments: what TOML cannot say in the file (no clipping), FTKIT_SETS, then the command line's."""
    sets = ["train.max_grad_norm=null"] if s.max_grad_norm is None else []
    return sets + FTKIT_SETS + list(extra)


def baseline_config(s: Settings, model: Path, data_file: Path, fmt: str, out_dir: Path) -> dict:
    """What the baseline scripts read: the same settings, in plain JSON."""
    return {**s.as_dict(), "model": str(model), "data": str(data_file), "format": fmt, "output_dir": str(out_dir)}
