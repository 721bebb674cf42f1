"""DPO/ORPO on the MLX backend, at the backend level (ftkit_mlx.preference), on the config-built tiny Llama.

What the loop relies on: the first step is the reference (loss log 2, rewards 0), the reference never moves,
micro-batches of pairs accumulate as one batch, packed rows give the padded rows' log-probabilities, and the
pair step's numbers are `objectives.numpy_terms` of the backend's own `sequence_logps`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from builders import PAIR_PAD, moved, one_batch, random_pairs
from mlx.utils import tree_flatten

from ftkit.adapters import init
from ftkit.backend.objectives import Preference, numpy_terms
from ftkit.backend.registry import get_backend
from ftkit.common.errors import FtkitError
from ftkit.data.batch import Example, Pair
from ftkit.data.pairs import pair_micro_batches
from ftkit.recipe.load import build_recipe


def make_recipe(model_dir: Path, kind: str = "lora", alpha: float = 8, model: dict | None = None, method: dict | None = None, **train):
    body = {"model": {"path": str(model_dir), **(model or {})}, "data": {"path": "-"},
            "method": {"kind": kind, "rank": 4, "alpha": alpha, "dropout": 0.0, **(method or {})},
            "train": {"objective": "dpo", "seed": 0, "lr": 1e-2, "optimizer": "adamw", **train},
            "torch": {"precision": "fp32"}}
    return build_recipe(body, "pref", check_paths=False)


def backend(model_dir: Path, kind: str = "lora", adapter: Path | None = None, tensors=None, alpha: float = 8, train: bool = True,
            model: dict | None = None, method: dict | None = None, **keys):
    """An MLX backend loaded to train `kind`, its adapter drawn as a run draws it (or `tensors`, or `adapter`'s)."""
    be = get_backend("mlx")
    be.load(make_recipe(model_dir, kind, alpha, model, method, **keys), model_dir, adapter=adapter, train=train)
    if adapter is None and kind != "full" and train:
        be.set_adapter_tensors(tensors if tensors is not None else init.draw(be.adapter_tensors(), 0))
    return be


def floats(sums: dict) -> dict[str, float]:
    return {k: float(v.item()) for k, v in sums.items()}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_first_step_is_the_reference_loss_log2_rewards_0(tiny_model_dir, kind):
    be = backend(tiny_model_dir, kind)
    be.set_reference(None)
    pb = one_batch(random_pairs(4))
    sums = floats(be.pair_forward_backward(pb, 0.25))
    assert sums["loss"] == pytest.approx(4 * math.log(2), abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert sums[k] == pytest.approx(0.0, abs=1e-5), k
    lp = be.sequence_logps(pb)
    assert sums["logps/chosen"] == pytest.approx(lp[0::2].sum(), rel=1e-5)
    assert lp.dtype == np.float64 and lp.shape == (8,) and (lp < 0).all()
    assert "base model with the adapter switched off" in be.describe()["reference"]


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from families import build_family

    return build_family("mixtral", tmp_path_factory.mktemp("mixtral"), tokenizer_dir)


@pytest.mark.parametrize("case", ["lora", "dora", "qlora", "lora-experts"])
def test_adapter_off_reference_is_the_base_and_stays_frozen(request, tiny_model_dir, case):
    """LoRA/DoRA/QLoRA, and LoRA on a MoE block's routed experts (Mixtral): switched off, exactly the base."""
    kind, model, method, model_dir = case.split("-")[0], None, None, tiny_model_dir
    if kind == "qlora":
        kind, model = "lora", {"quantize": "4bit"}
    if case == "lora-experts":
        model_dir, method = request.getfixturevalue("mixtral_dir"), {"targets": ["all-linear", "experts"]}
    pb = one_batch(random_pairs(4))
    base = backend(model_dir, "full", train=False, model=model).sequence_logps(pb)  # mlx-lm's model, no adapter layers at all
    be = backend(model_dir, kind, model=model, method=method)
    be.set_adapter_tensors(moved(be.adapter_tensors()))
    if kind == "dora":  # a magnitude away from ||W||: DoRA switched off must be W itself, not m * W / ||W||
        be.set_adapter_tensors({k: v * 1.1 if "magnitude" in k else v for k, v in be.adapter_tensors().items()})
    be.set_reference(None)
    ref0, policy0 = be.sequence_logps(pb, reference=True), be.sequence_logps(pb)
    np.testing.assert_allclose(ref0, base, rtol=1e-6)
    assert np.abs(policy0 - ref0).max() > 1e-2  # the policy is not the base: the check above can fail
    for _ in range(3):
        be.pair_forward_backward(pb, 0.25)
        be.optimizer_step(1e-2)
    assert np.array_equal(be.sequence_logps(pb, reference=True), ref0)
    assert np.abs(be.sequence_logps(pb) - policy0).max() > 1e-3  # it trained


def test_adapter_reference_is_that_adapter_frozen(tiny_model_dir, tmp_path):
    pb = one_batch(random_pairs(4))
    start = backend(tiny_model_dir)
    start.set_adapter_tensors(moved(start.adapter_tensors()))
    start.save_adapter(tmp_path / "sft")
    be = backend(tiny_model_dir, adapter=tmp_path / "sft")  # a DPO stage starting from an SFT adapter
    be.set_reference(tmp_path / "sft")
    assert str(tmp_path / "sft") in be.describe()["reference"]
    ref0 = be.sequence_logps(pb, reference=True)
    np.testing.assert_allclose(ref0, be.sequence_logps(pb), rtol=1e-6)  # step 0: policy = reference
    base = backend(tiny_model_dir, "full", train=False).sequence_logps(pb)
    assert np.abs(ref0 - base).max() > 1e-2
    sums = floats(be.pair_forward_backward(pb, 0.25))
    assert sums["loss"] == pytest.approx(4 * math.log(2), abs=1e-5)
    be.optimizer_step(1e-2)
    for _ in range(2):
        be.pair_forward_backward(pb, 0.25)
        be.optimizer_step(1e-2)
    assert np.array_equal(be.sequence_logps(pb, reference=True), ref0)
    assert np.abs(be.sequence_logps(pb) - ref0).max() > 1e-3


def test_reference_adapter_with_another_alpha_and_a_mismatched_one(tiny_model_dir, tmp_path):
    """A reference saved with another lora_alpha computes as that adapter does (its scale folded into B);
    one of another rank is refused, naming why."""
    pb = one_batch(random_pairs(2))
    other = backend(tiny_model_dir, alpha=16)
    other.set_adapter_tensors(moved(other.adapter_tensors()))
    other.save_adapter(tmp_path / "a16")
    be = backend(tiny_model_dir)  # alpha 8
    be.set_reference(tmp_path / "a16")
    np.testing.assert_allclose(be.sequence_logps(pb, reference=True),
                               backend(tiny_model_dir, adapter=tmp_path / "a16", alpha=16).sequence_logps(pb), rtol=1e-6)
    wide = get_backend("mlx")
    recipe = make_recipe(tiny_model_dir)
    recipe.method.rank = 8
    wide.load(recipe, tiny_model_dir, adapter=None, train=True)
    wide.save_adapter(tmp_path / "r8")
    with pytest.raises(FtkitError, match="same modules with the same rank"):
        be.set_reference(tmp_path / "r8")


def test_full_reference_is_a_frozen_copy_of_the_start(tiny_model_dir):
    pb = one_batch(random_pairs(2))
    be = backend(tiny_model_dir, "full", lr=1e-3)
    be.set_reference(None)
    assert "frozen copy" in be.describe()["reference"]
    ref0 = be.sequence_logps(pb, reference=True)
    np.testing.assert_allclose(ref0, be.sequence_logps(pb), rtol=1e-6)
    assert floats(be.pair_forward_backward(pb, 0.5))["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)
    be.optimizer_step(1e-3)
    be.pair_forward_backward(pb, 0.5)
    be.optimizer_step(1e-3)
    assert np.array_equal(be.sequence_logps(pb, reference=True), ref0)
    assert np.abs(be.sequence_logps(pb) - ref0).max() > 1e-3


def test_four_micro_batches_of_one_pair_equal_one_of_four(tiny_model_dir):
    ps = random_pairs(4)
    start = moved(backend(tiny_model_dir).adapter_tensors())
    whole, parts = backend(tiny_model_dir, tensors=start), backend(tiny_model_dir, tensors=start)
    for be in (whole, parts):
        be.set_reference(None)
    total = floats(whole.pair_forward_backward(one_batch(ps), 0.25))
    split = [floats(parts.pair_forward_backward(pb, 0.25)) for pb in pair_micro_batches(ps, 1, PAIR_PAD, False)]
    for k, v in total.items():
        assert sum(s[k] for s in split) == pytest.approx(v, rel=1e-5, abs=1e-6), k
    a, b = dict(tree_flatten(whole.grads)), dict(tree_flatten(parts.grads))
    assert sorted(a) == sorted(b)
    assert max(float(mx.abs(a[k]).max()) for k in a) > 1e-4
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-7)
    whole.optimizer_step(1e-2)
    parts.optimizer_step(1e-2)
    x, y = whole.adapter_tensors(), parts.adapter_tensors()
    assert max(np.abs(x[k] - y[k]).max() for k in x) < 1e-6


def test_packed_rows_give_the_padded_log_probs_and_step(tiny_model_dir):
    long = Pair(Example(list(range(20, 50)), [0] * 22 + [1] * 8), Example(list(range(60, 86)), [0] * 22 + [1] * 4))
    ps = [long, *random_pairs(5, seed=3)]  # rows as long as the longest sequence: the short ones share them
    padded, packed = one_batch(ps), one_batch(ps, packing=True)
    assert packed.batch.positions is not None and packed.batch.inputs.shape[0] < 12  # several sequences share rows
    be = backend(tiny_model_dir, tensors=moved(backend(tiny_model_dir).adapter_tensors()))
    be.set_reference(None)
    np.testing.assert_allclose(be.sequence_logps(packed), be.sequence_logps(padded), rtol=1e-5)
    np.testing.assert_allclose(be.sequence_logps(packed, reference=True), be.sequence_logps(padded, reference=True), rtol=1e-5)
    a, b = floats(be.pair_forward_backward(packed, 1.0)), floats(be.pair_forward_backward(padded, 1.0))
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("train", [{"objective": "dpo", "label_smoothing": 0.2, "beta": 0.5}, {"objective": "dpo", "loss_type": "ipo"},
                                   {"objective": "orpo", "orpo_lambda": 0.3}], ids=["dpo-smoothed", "ipo", "orpo"])
def test_pair_step_is_numpy_terms_of_sequence_logps(tiny_model_dir, train):
    """The MLX ops given to `pair_terms` compute what numpy's do, on the backend's own log-probabilities."""
    pb = one_batch(random_pairs(4, seed=5))
    be = backend(tiny_model_dir, tensors=moved(backend(tiny_model_dir).adapter_tensors(), size=0.2), **train)
    pref = Preference.of(be.recipe.train)
    ref = be.sequence_logps(pb, reference=True) if pref.uses_reference else None
    want = {k: float(v.sum()) for k, v in numpy_terms(pref, be.sequence_logps(pb), pb.tokens_per_sequence, ref).items()}
    got = floats(be.pair_forward_backward(pb, 1.0))
    assert sorted(got) == sorted(pref.metric_names)
    assert abs(want["rewards/margins"]) > 1e-3  # the policy is away from the reference
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k


def test_sft_recipe_refuses_the_pair_step(tiny_model_dir):
    be = backend(tiny_model_dir, objective="sft")
    with pytest.raises(FtkitError, match="objective is 'sft'"):
        be.pair_forward_backward(one_batch(random_pairs(1)), 1.0)
