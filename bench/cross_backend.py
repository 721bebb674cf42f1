"""Cross-backend agreement figures on a config-built tiny Llama (fp32): the numbers the tests bound.

For LoRA, DoRA and soft prompts: train 20 steps on each backend from one recipe, then report the
largest relative difference of the two loss curves, and the largest absolute logit difference of
each adapter on the other backend and through plain PEFT.  Run: python bench/cross_backend.py

With `--real MODEL_DIR ADAPTER_DIR` it instead compares one trained adapter on a real model (e.g. the
quickstart's SmolLM2 adapter): logits of a WikiSQL prompt on MLX and on torch, and the eval loss of
the first 8 test examples on both.
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


def real(model: Path, adapter: Path) -> None:
    import time

    from ftkit.data.token_cache import load_splits
    from ftkit.evaluate.inference import load_for_inference
    from ftkit.models.tokenizer import load_tokenizer
    from ftkit.recipe.load import build_recipe
    from ftkit.train.validate import evaluate

    tok = load_tokenizer(model)
    recipe = build_recipe({"model": {"path": str(model)}, "data": {"path": str(WIKISQL), "max_seq_length": 512},
                           "torch": {"precision": "fp32"}}, "bench", check_paths=False)
    test = load_splits(recipe.data, tok).test[:8]
    out = {}
    for name in ("torch", "mlx"):
        t0 = time.perf_counter()
        out[f"{name}_logits"] = logits_on(name, model, adapter)
        be = load_for_inference(recipe, name, adapter, model, tok)
        out[f"{name}_loss"] = evaluate(be, test, 4, tok.pad_token_id)
        out[f"{name}_seconds"] = time.perf_counter() - t0
    print(json.dumps({
        "max_abs_logit_diff": float(np.abs(out["torch_logits"] - out["mlx_logits"]).max()),
        "logit_scale": float(np.abs(out["torch_logits"]).max()),
        "eval_loss_torch": out["torch_loss"], "eval_loss_mlx": out["mlx_loss"],
        "seconds_torch": out["torch_seconds"], "seconds_mlx": out["mlx_seconds"],
    }, indent=2))


def main() -> None:
    if sys.argv[1:2] == ["--real"]:
        real(Path(sys.argv[2]), Path(sys.argv[3]))
        return
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
