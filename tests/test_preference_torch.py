"""DPO/ORPO on the torch backend, at the backend level (ftkit_torch.preference), on the config-built tiny Llama.

What the loop relies on: the first step is the reference (loss log 2, rewards 0), the reference never moves (adapter
off, a reference adapter, a full model copy; QLoRA too), micro-batches of pairs accumulate as one batch, packed rows
give the padded rows' log-probabilities, the log-probabilities are the model's own logits', and the pair step's
numbers are `objectives.numpy_terms` of the backend's `sequence_logps`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from builders import PAIR_PAD, moved, one_batch, random_pairs

from ftkit.adapters import init
from ftkit.backend.objectives import Preference, numpy_terms
from ftkit.backend.registry import get_backend
from ftkit.common.errors import AdapterMismatchError, FtkitError
from ftkit.data.batch import Example, Pair
from ftkit.data.pairs import pair_micro_batches
from ftkit.recipe.load import build_recipe


def make_recipe(model_dir: Path, kind: str = "lora", quantize: str = "none", **train):
    body = {"model": {"path": str(model_dir), "quantize": quantize}, "data": {"path": "-"},
            "method": {"kind": kind, "rank": 4, "alpha": 8, "dropout": 0.0},
            "train": {"objective": "dpo", "seed": 0, "lr": 1e-2, "optimizer": "adamw", **train},
            "torch": {"precision": "fp32"}}
    return build_recipe(body, "pref", check_paths=False)


def backend(model_dir: Path, kind: str = "lora", adapter: Path | None = None, tensors=None, train: bool = True,
            quantize: str = "none", reference: object = "none", **keys):
    """A torch backend loaded to train `kind` (its adapter drawn as a run draws it, or `tensors`, or `adapter`'s),
    its reference set (`reference`: "none" = set_reference(None), a path, or False = not set), ready to step."""
    be = get_backend("torch")
    be.load(make_recipe(model_dir, kind, quantize, **keys), model_dir, adapter=adapter, train=train)
    if adapter is None and kind != "full" and train:
        be.set_adapter_tensors(tensors if tensors is not None else init.draw(be.adapter_tensors(), 0))
    if reference is not False:
        be.set_reference(None if reference == "none" else reference)
    if train:
        be.start_training()
    return be


@pytest.fixture(scope="module")
def start(tiny_model_dir) -> dict[str, np.ndarray]:
    """LoRA tensors as a run draws them, B moved off zero: a policy away from its reference."""
    return moved(backend(tiny_model_dir, reference=False).adapter_tensors())


def floats(sums: dict) -> dict[str, float]:
    return {k: float(v) for k, v in sums.items()}


def grads(be) -> dict[str, np.ndarray]:
    return {n: p.grad.detach().numpy().copy() for n, p in be.model.named_parameters() if p.grad is not None}


def steps(be, pb, n: int = 3, lr: float = 1e-2) -> None:
    for _ in range(n):
        be.pair_forward_backward(pb, 1.0 / pb.n_pairs)
        be.optimizer_step(lr)


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_first_step_is_the_reference_loss_log2_rewards_0(tiny_model_dir, kind):
    be = backend(tiny_model_dir, kind)
    pb = one_batch(random_pairs(4))
    out = be.pair_forward_backward(pb, 0.25)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in out.values())  # device scalars: no host sync
    sums = floats(out)
    assert sorted(sums) == sorted(Preference.of(be.recipe.train).metric_names)
    assert sums["loss"] == pytest.approx(4 * math.log(2), abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert sums[k] == pytest.approx(0.0, abs=1e-5), k
    lp = be.sequence_logps(pb)
    assert lp.dtype == np.float64 and lp.shape == (8,) and (lp < 0).all()
    assert sums["logps/chosen"] == pytest.approx(lp[0::2].sum(), rel=1e-5)
    assert sums["logps/rejected"] == pytest.approx(lp[1::2].sum(), rel=1e-5)
    assert max(np.abs(g).max() for g in grads(be).values()) > 1e-6  # log 2 has a gradient: the step moves
    info = be.describe()
    if kind == "full":
        assert info["reference"].startswith("the base model at") and "frozen copy" in info["reference"]
        assert info["reference_bytes"] == sum(p.numel() * 4 for p in be.model.parameters())  # a second fp32 model
    else:
        assert "base model with the adapter switched off" in info["reference"] and info["reference_bytes"] == 0


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_off_reference_is_the_base_and_stays_frozen(tiny_model_dir, start, kind):
    pb = one_batch(random_pairs(4))
    base = backend(tiny_model_dir, "full", train=False).sequence_logps(pb)  # the plain model, no adapter layers at all
    tensors = start
    if kind == "dora":  # a magnitude away from ||W||: DoRA switched off must be W itself, not m * W / ||W||
        be0 = backend(tiny_model_dir, kind, reference=False)
        tensors = {k: v * 1.1 if "magnitude" in k else v for k, v in moved(be0.adapter_tensors()).items()}
    be = backend(tiny_model_dir, kind, tensors=tensors)
    trained = {n: p for n, p in be.model.named_parameters() if p.requires_grad}
    in_optimizer = {id(p) for g in be.optimizer.param_groups for p in g["params"]}
    ref0, policy0 = be.sequence_logps(pb, reference=True), be.sequence_logps(pb)
    np.testing.assert_allclose(ref0, base, rtol=1e-6)
    assert np.abs(policy0 - ref0).max() > 1e-2  # the policy is not the base: the check above can fail
    steps(be, pb)
    assert np.array_equal(be.sequence_logps(pb, reference=True), ref0)
    assert np.abs(be.sequence_logps(pb) - policy0).max() > 1e-3  # it trained
    # the switch left the trained parameters as they were: same objects, trainable, in the optimizer
    assert {n: p for n, p in be.model.named_parameters() if p.requires_grad} == trained
    assert {id(p) for p in trained.values()} == in_optimizer


def test_adapter_reference_is_that_adapter_frozen(tiny_model_dir, start, tmp_path):
    pb = one_batch(random_pairs(4))
    sft = backend(tiny_model_dir, tensors=start, reference=False)
    sft.save_adapter(tmp_path / "sft")
    base = backend(tiny_model_dir, "full", train=False).sequence_logps(pb)
    be = backend(tiny_model_dir, adapter=tmp_path / "sft", reference=tmp_path / "sft")  # DPO after an SFT stage
    info = be.describe()
    assert info["reference"] == f"the adapter {tmp_path / 'sft'}, frozen"
    assert info["reference_bytes"] == sum(v.nbytes for v in start.values())
    ref0 = be.sequence_logps(pb, reference=True)
    np.testing.assert_allclose(ref0, be.sequence_logps(pb), rtol=1e-6)  # step 0: policy = reference
    assert np.abs(ref0 - base).max() > 1e-2  # and not the base
    assert floats(be.pair_forward_backward(pb, 0.25))["loss"] == pytest.approx(4 * math.log(2), abs=1e-5)
    be.optimizer_step(1e-2)
    steps(be, pb, 2)
    assert np.array_equal(be.sequence_logps(pb, reference=True), ref0)
    assert np.abs(be.sequence_logps(pb) - ref0).max() > 1e-3
    # the result is the trained adapter alone, as PEFT loads it
    be.save_adapter(tmp_path / "dpo")
    assert not [p for p in (tmp_path / "dpo").iterdir() if p.is_dir()]  # PEFT would add a reference/ folder
    assert not any("reference" in k for k in be.adapter_tensors())


def test_a_reference_that_is_not_a_lora_adapter_is_refused(tiny_model_dir, tmp_path):
    be = get_backend("torch")
    recipe = make_recipe(tiny_model_dir, "prompt", objective="sft")  # (the recipe checks refuse prompt tuning for DPO)
    recipe.method.num_virtual_tokens = 4
    be.load(recipe, tiny_model_dir, adapter=None, train=True)
    be.save_adapter(tmp_path / "soft")
    with pytest.raises(FtkitError, match="no reference for DPO"):
        be.set_reference(None)
    lora = backend(tiny_model_dir, reference=False)
    with pytest.raises(AdapterMismatchError, match="a prompt adapter cannot be the DPO reference"):
        lora.set_reference(tmp_path / "soft")
    with pytest.raises(AdapterMismatchError, match="not an adapter folder"):
        lora.set_reference(tmp_path / "nothing")


def test_full_reference_is_a_frozen_copy_and_a_path_is_that_model(tiny_model_dir, tmp_path):
    from builders import build_tiny_llama

    pb = one_batch(random_pairs(2))
    be = backend(tiny_model_dir, "full", lr=1e-3)
    ref0 = be.sequence_logps(pb, reference=True)
    np.testing.assert_allclose(ref0, be.sequence_logps(pb), rtol=1e-6)
    steps(be, pb, 2, lr=1e-3)
    assert np.array_equal(be.sequence_logps(pb, reference=True), ref0)
    assert np.abs(be.sequence_logps(pb) - ref0).max() > 1e-3
    other = build_tiny_llama(tmp_path / "other", seed=1)
    be.set_reference(other)
    assert be.describe()["reference"] == f"the model at {other}, a frozen copy"
    np.testing.assert_allclose(be.sequence_logps(pb, reference=True),
                               backend(other, "full", train=False).sequence_logps(pb), rtol=1e-6)


def test_qlora_nf4_reference_is_the_quantized_base_and_stays_frozen(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    pb = one_batch(random_pairs(2))
    be = backend(tiny_model_dir, quantize="nf4", tensors=None)
    assert type(be.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    sums = floats(be.pair_forward_backward(pb, 0.5))
    assert sums["loss"] == pytest.approx(2 * math.log(2), abs=1e-5) and sums["rewards/margins"] == pytest.approx(0, abs=1e-5)
    be.optimizer_step(1e-2)
    ref0 = be.sequence_logps(pb, reference=True)
    steps(be, pb, 2)
    np.testing.assert_array_equal(be.sequence_logps(pb, reference=True), ref0)
    assert np.abs(be.sequence_logps(pb) - ref0).max() > 1e-3
    # the reference is the nf4 base itself: the same numbers as a plain forward with the adapter switched off
    with torch.no_grad(), be.model.disable_adapter():
        be.model.eval()
        plain = be.sequence_logps(pb)
    np.testing.assert_allclose(ref0, plain, rtol=1e-6)


@pytest.mark.parametrize(("objective", "packing"), [("dpo", False), ("dpo", True), ("orpo", False)],
                         ids=["dpo-padded", "dpo-packed", "orpo-padded"])
def test_four_micro_batches_of_one_pair_equal_one_of_four(tiny_model_dir, start, objective, packing):
    ps = random_pairs(4)
    whole = backend(tiny_model_dir, tensors=start, objective=objective)
    parts = backend(tiny_model_dir, tensors=start, objective=objective)
    total = floats(whole.pair_forward_backward(one_batch(ps, packing), 0.25))
    split = [floats(parts.pair_forward_backward(pb, 0.25, sync=i == 3))
             for i, pb in enumerate(pair_micro_batches(ps, 1, PAIR_PAD, packing))]
    for k, v in total.items():
        assert sum(s[k] for s in split) == pytest.approx(v, rel=1e-5, abs=1e-6), k
    a, b = grads(whole), grads(parts)
    assert sorted(a) == sorted(b) and max(np.abs(g).max() for g in a.values()) > 1e-4
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_packed_rows_give_the_padded_log_probs_and_step(tiny_model_dir, start):
    long = Pair(Example(list(range(20, 50)), [0] * 22 + [1] * 8), Example(list(range(60, 86)), [0] * 22 + [1] * 4))
    ps = [long, *random_pairs(5, seed=3)]  # rows as long as the longest sequence: the short ones share them
    padded, packed = one_batch(ps), one_batch(ps, packing=True)
    assert packed.batch.positions is not None and packed.batch.inputs.shape[0] < 12  # several sequences share rows
    be = backend(tiny_model_dir, tensors=start)
    np.testing.assert_allclose(be.sequence_logps(packed), be.sequence_logps(padded), rtol=1e-5)
    np.testing.assert_allclose(be.sequence_logps(packed, reference=True), be.sequence_logps(padded, reference=True), rtol=1e-5)
    a = floats(be.pair_forward_backward(packed, 1.0))
    ga = grads(be)
    be.optimizer.zero_grad(set_to_none=True)
    b = floats(be.pair_forward_backward(padded, 1.0))
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for k, g in grads(be).items():
        np.testing.assert_allclose(ga[k], g, rtol=1e-3, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("logits_at", ["targets", "columns", "all"])
def test_sequence_logps_are_the_plain_logits_log_probs(tiny_model_dir, start, logits_at):
    """Whichever way the backend selects the head's positions (transformers 5's boolean mask, older versions'
    shared columns, a model without logits_to_keep)."""
    ps = random_pairs(3, seed=7)
    be = backend(tiny_model_dir, tensors=start)
    be.logits_at = logits_at
    got = be.sequence_logps(one_batch(ps))
    want = []
    with torch.no_grad():
        be.model.eval()
        for p in ps:
            for ex in (p.chosen, p.rejected):
                ids = torch.tensor([ex.ids])
                logp = torch.log_softmax(be.model(input_ids=ids).logits[0].double(), -1)
                want.append(sum(float(logp[t - 1, ex.ids[t]]) for t in range(1, len(ex.ids)) if ex.mask[t]))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_the_chunked_head_gives_the_same_log_probs_and_gradients(tiny_model_dir, start, monkeypatch):
    """Large vocabularies x many targets: the head runs a chunk of tokens at a time inside the forward."""
    from ftkit_torch import loss, preference

    pb = one_batch(random_pairs(4, seed=2))
    plain, chunked = backend(tiny_model_dir, tensors=start), backend(tiny_model_dir, tensors=start)
    assert chunked.head_loss is not None and chunked.head_loss.enabled
    a = floats(plain.pair_forward_backward(pb, 0.25))
    lp = plain.sequence_logps(pb)
    calls = []
    real = preference._chunked_logps
    monkeypatch.setattr(preference, "_chunked_logps", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 1)
    chunked.head_loss.chunk_tokens = 5
    b = floats(chunked.pair_forward_backward(pb, 0.25))
    assert calls  # the chunked path ran
    np.testing.assert_allclose(chunked.sequence_logps(pb), lp, rtol=1e-6)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k
    ga, gb = grads(plain), grads(chunked)
    for k in ga:
        np.testing.assert_allclose(gb[k], ga[k], rtol=1e-5, atol=1e-8, err_msg=k)


@pytest.mark.parametrize("train", [{"objective": "dpo", "label_smoothing": 0.2, "beta": 0.5}, {"objective": "dpo", "loss_type": "ipo"},
                                   {"objective": "orpo", "orpo_lambda": 0.3}], ids=["dpo-smoothed", "ipo", "orpo"])
def test_pair_step_is_numpy_terms_of_sequence_logps(tiny_model_dir, start, train):
    """The torch ops given to `pair_terms` compute what numpy's do, on the backend's own log-probabilities."""
    pb = one_batch(random_pairs(4, seed=5))
    be = backend(tiny_model_dir, tensors=moved(start, size=0.2), **train)
    pref = Preference.of(be.recipe.train)
    ref = be.sequence_logps(pb, reference=True) if pref.uses_reference else None
    want = {k: float(v.sum()) for k, v in numpy_terms(pref, be.sequence_logps(pb), pb.tokens_per_sequence, ref).items()}
    got = floats(be.pair_forward_backward(pb, 1.0))
    assert sorted(got) == sorted(pref.metric_names)
    assert abs(want["rewards/margins"]) > 1e-3  # the policy is away from the reference
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k


def test_sync_false_defers_the_gradient_reduction(tiny_model_dir, monkeypatch):
    be = backend(tiny_model_dir)
    seen = []
    real = be._gradient_sync
    monkeypatch.setattr(be, "_gradient_sync", lambda sync: seen.append(sync) or real(sync))
    pb = one_batch(random_pairs(1))
    be.pair_forward_backward(pb, 0.5, sync=False)
    be.pair_forward_backward(pb, 0.5)
    assert seen == [False, True]


def test_sft_recipe_refuses_the_pair_step(tiny_model_dir):
    be = backend(tiny_model_dir, objective="sft", reference=False)
    with pytest.raises(FtkitError, match="objective is 'sft'"):
        be.pair_forward_backward(one_batch(random_pairs(1)), 1.0)


def test_torch_ops_give_numpys_values_and_the_analytic_gradient():
    from ftkit_torch.preference import TORCH_OPS

    from ftkit.backend.objectives import pair_terms

    rng = np.random.default_rng(0)
    seq, ref = -rng.uniform(1, 30, 8), -rng.uniform(1, 30, 8)
    tokens = rng.integers(1, 9, 8).astype(np.float64)
    for pref in (Preference("dpo", beta=0.3, label_smoothing=0.1), Preference("dpo", loss_type="ipo"), Preference("orpo")):
        lp = torch.tensor(seq, requires_grad=True)
        r, n = torch.tensor(ref), torch.tensor(tokens)
        got = pair_terms(TORCH_OPS, pref, lp[0::2], lp[1::2], n[0::2], n[1::2], *((r[0::2], r[1::2]) if pref.uses_reference else ()))
        want = numpy_terms(pref, seq, tokens, ref if pref.uses_reference else None)
        for k in want:
            np.testing.assert_allclose(got[k].detach().numpy(), want[k], rtol=1e-12, err_msg=k)
            assert k == "loss" or not got[k].requires_grad  # metrics carry no graph
        if pref.objective == "dpo" and pref.loss_type == "sigmoid":
            got["loss"].sum().backward()
            b, ls = pref.beta, pref.label_smoothing
            h = (seq[0::2] - ref[0::2]) - (seq[1::2] - ref[1::2])
            sig = 1 / (1 + np.exp(-b * h))
            d = -(1 - ls) * b * (1 - sig) + ls * b * sig  # d loss / d chosen; the rejected's is its negative
            np.testing.assert_allclose(lp.grad.numpy()[0::2], d, rtol=1e-10)
            np.testing.assert_allclose(lp.grad.numpy()[1::2], -d, rtol=1e-10)
