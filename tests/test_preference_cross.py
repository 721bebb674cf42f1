"""DPO/ORPO: the same numbers on MLX and on torch, at the backend level.

One config-built tiny Llama folder (fp32) and the same adapter tensors (set_adapter_tensors) on both backends:
the per-sequence log-probabilities (policy and reference), the pair step's loss and metrics, and a few AdamW
steps of DPO agree to 1e-4 relative (the loop-level agreement over 20 steps is the loop's tests')."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from builders import PAIR_PAD, moved, one_batch, random_pairs
from test_preference_mlx import make_recipe

from ftkit.adapters import init
from ftkit.backend.registry import get_backend
from ftkit.data.pairs import pair_micro_batches

RTOL = 1e-4


def loaded(name: str, model_dir: Path, kind: str, tensors=None, adapter: Path | None = None, reference: Path | None = None, **train):
    be = get_backend(name)
    be.load(make_recipe(model_dir, kind, **train), model_dir, adapter=adapter, train=True)
    if tensors is not None:
        be.set_adapter_tensors(tensors)
    be.start_training()
    be.set_reference(reference)
    return be


def floats(sums: dict) -> dict[str, float]:
    return {k: float(v.item()) for k, v in sums.items()}


def close(key: str, a: float, b: float) -> bool:
    """The loss and the log-probabilities: 1e-4 relative. The rewards and the other metrics are beta x differences
    of two sums of tens of log-probabilities, near 0 in the first steps, where float32's rounding of those sums
    (~1e-6) is more than 1e-4 of them: 1e-4 relative or 1e-5 absolute."""
    floor = 0.0 if key == "loss" or key.startswith("logps/") else 1e-5
    return abs(a - b) <= RTOL * max(abs(a), abs(b)) + floor


@pytest.fixture(scope="module")
def start(tiny_model_dir):
    """An adapter away from the base (B non-zero), in the common layout, for both backends."""
    be = get_backend("mlx")
    be.load(make_recipe(tiny_model_dir, "lora"), tiny_model_dir, adapter=None, train=True)
    lora = moved(init.draw(be.adapter_tensors(), 0), size=0.1)
    be = get_backend("mlx")
    be.load(make_recipe(tiny_model_dir, "dora"), tiny_model_dir, adapter=None, train=True)
    dora = moved(init.draw(be.adapter_tensors(), 0), size=0.1)
    return {"lora": lora, "dora": {k: v * 1.05 if "magnitude" in k else v for k, v in dora.items()}}


@pytest.mark.parametrize("kind,packing", [("lora", False), ("lora", True), ("dora", False)], ids=["lora-padded", "lora-packed", "dora-padded"])
def test_sequence_logps_and_pair_step_agree(tiny_model_dir, start, kind, packing):
    ps = random_pairs(6, seed=7)
    pb = one_batch(ps, packing)
    t, m = (loaded(name, tiny_model_dir, kind, start[kind]) for name in ("torch", "mlx"))
    for reference in (False, True):
        a, b = t.sequence_logps(pb, reference=reference), m.sequence_logps(pb, reference=reference)
        np.testing.assert_allclose(a, b, rtol=RTOL)
    assert np.abs(t.sequence_logps(pb) - t.sequence_logps(pb, reference=True)).max() > 1e-2  # policy != reference
    st, sm = floats(t.pair_forward_backward(pb, 1 / 6)), floats(m.pair_forward_backward(pb, 1 / 6))
    assert sorted(st) == sorted(sm)
    for k in st:
        assert close(k, st[k], sm[k]), (k, st[k], sm[k])


@pytest.mark.parametrize("case", ["lora", "dora", "lora-adapter-reference", "lora-orpo"])
def test_dpo_steps_agree(tiny_model_dir, start, tmp_path, case):
    """3 optimizer steps of 4 pairs (2 micro-batches of 2), AdamW, dropout 0: the same losses and metrics."""
    kind = case.split("-")[0]
    train = {"lr": 1e-2, "beta": 0.5}
    if case.endswith("orpo"):
        train["objective"] = "orpo"
    args = {"tensors": start[kind]}
    if case.endswith("adapter-reference"):  # a DPO stage that starts from an SFT adapter: the policy and reference
        sft = get_backend("mlx")
        sft.load(make_recipe(tiny_model_dir, kind), tiny_model_dir, adapter=None, train=True)
        sft.set_adapter_tensors(start[kind])
        sft.save_adapter(tmp_path / "sft")
        args = {"adapter": tmp_path / "sft", "reference": tmp_path / "sft"}
    ps = random_pairs(12, seed=11)
    first = one_batch(ps[:4])
    runs, before, after = {}, {}, {}
    for name in ("torch", "mlx"):
        be = loaded(name, tiny_model_dir, kind, **args, **train)
        before[name] = be.sequence_logps(first)
        rows = []
        for step in range(3):
            sums = [floats(be.pair_forward_backward(pb, 1 / 4)) for pb in pair_micro_batches(ps[4 * step : 4 * step + 4], 2, PAIR_PAD, False)]
            be.optimizer_step(train["lr"])
            rows.append({k: sum(s[k] for s in sums) / 4 for k in sums[0]})
        runs[name], after[name] = rows, be.sequence_logps(first)
    for step, (rt, rm) in enumerate(zip(runs["torch"], runs["mlx"])):
        for k in rt:
            assert close(k, rt[k], rm[k]), (step, k, rt[k], rm[k])
    assert np.abs(after["mlx"] - before["mlx"]).max() > 1e-2  # it trained: the comparison is not of a standing policy
    np.testing.assert_allclose(after["torch"], after["mlx"], rtol=RTOL)
