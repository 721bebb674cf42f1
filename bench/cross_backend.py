"""Cross-backend agreement figures on a config-built tiny Llama (fp32): the numbers the tests bound.

For LoRA, DoRA and soft prompts: train 20 steps on each backend from one recipe, then report the
largest relative difference of the two loss curves, and the largest absolute logit difference of
each adapter on the other backend and through plain PEFT.  Run: python bench/cross_backend.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "backends"), str(REPO)]

import numpy as np  # noqa: E402
from builders import WIKISQL, build_tiny_llama  # noqa: E402
from test_cross_backend import logits_on, peft_logits, train  # noqa: E402


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ftkit-cross-"))
    model = build_tiny_llama(tmp / "model")
    data = tmp / "data"
    data.mkdir()
    for split, n in (("train", 48), ("valid", 16), ("test", 16)):
        (data / f"{split}.jsonl").write_text("\n".join((WIKISQL / f"{split}.jsonl").read_text().splitlines()[:n]) + "\n")
    rows = []
    for kind in ("lora", "dora", "prompt"):
        (res_t, loss_t, _), (res_m, loss_m, _) = (train(tmp, model, data, b, kind) for b in ("torch", "mlx"))
        rel = float(np.max(np.abs(np.array(loss_t) - np.array(loss_m)) / np.array(loss_t)))
        mlx_on_mlx = logits_on("mlx", model, res_m.adapter)
        torch_on_torch = logits_on("torch", model, res_t.adapter)
        rows.append({
            "method": kind,
            "loss_rel_diff_20_steps": rel,
            "mlx_adapter_mlx_vs_torch": float(np.abs(mlx_on_mlx - logits_on("torch", model, res_m.adapter)).max()),
            "mlx_adapter_mlx_vs_peft": float(np.abs(mlx_on_mlx - peft_logits(model, res_m.adapter)).max()),
            "torch_adapter_torch_vs_mlx": float(np.abs(torch_on_torch - logits_on("mlx", model, res_t.adapter)).max()),
            "adapter_effect": float(np.abs(mlx_on_mlx - logits_on("torch", model, None)).max()),
        })
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
