"""The preference formulas (ftkit.backend.objectives) on hand-computed log-probabilities, through numpy.

One pair throughout unless said: the policy gives the chosen response -10 over 4 tokens and the rejected -12 over
5; the reference gives each -11. So the DPO log-ratio margin is h = (-10 + 11) - (-12 + 11) = 2.
The expected numbers were worked out by hand (the formulas in the comments) and are pinned as literals.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from ftkit.backend.objectives import (
    LOG2,
    METRICS,
    ORPO_METRICS,
    Preference,
    numpy_terms,
)

SEQ = [-10.0, -12.0]  # chosen, rejected (a PairBatch's order: 2i chosen, 2i + 1 rejected)
TOKENS = [4.0, 5.0]
REF = [-11.0, -11.0]


def terms(pref: Preference, seq=SEQ, tokens=TOKENS, ref=REF) -> dict[str, float]:
    out = numpy_terms(pref, seq, tokens, ref if pref.uses_reference else None)
    assert all(v.shape == (len(seq) // 2,) for v in out.values())
    return {k: float(v[0]) for k, v in out.items()}


def test_sigmoid_dpo():
    t = terms(Preference("dpo", beta=0.1))
    assert t["loss"] == pytest.approx(0.5981388693815918, rel=1e-12)  # -log s(0.1 * 2) = log(1 + e^-0.2)
    assert t["rewards/chosen"] == pytest.approx(0.1)  # 0.1 * (-10 + 11)
    assert t["rewards/rejected"] == pytest.approx(-0.1)  # 0.1 * (-12 + 11)
    assert t["rewards/margins"] == pytest.approx(0.2)
    assert t["rewards/accuracies"] == 1.0
    assert (t["logps/chosen"], t["logps/rejected"]) == (-10.0, -12.0)  # sums, as TRL logs them


def test_sigmoid_dpo_with_label_smoothing():
    # cDPO: -(1 - 0.1) log s(0.2) - 0.1 log s(-0.2) = 0.9 * 0.598138869 + 0.1 * 0.798138869
    t = terms(Preference("dpo", beta=0.1, label_smoothing=0.1))
    assert t["loss"] == pytest.approx(0.6181388693815918, rel=1e-12)
    assert t["rewards/margins"] == pytest.approx(0.2)  # the rewards do not depend on the smoothing
    # smoothing moves the loss's minimum from an infinite margin to b h = log((1 - 0.1) / 0.1) = log 9: beyond, it rises
    far = terms(Preference("dpo", beta=0.1, label_smoothing=0.1), ref=[-60.0, 40.0])  # h = 50 + 52 = 102
    assert far["loss"] == pytest.approx(0.9 * math.log1p(math.exp(-10.2)) + 0.1 * math.log1p(math.exp(10.2)), rel=1e-12)
    assert far["loss"] > t["loss"]


def test_ipo_loss_on_per_token_means_rewards_on_sums():
    # h per token = (-10 + 11) / 4 - (-12 + 11) / 5 = 0.25 + 0.2 = 0.45; loss = (0.45 - 1 / (2 * 0.1))^2 = (-4.55)^2
    t = terms(Preference("dpo", beta=0.1, loss_type="ipo"))
    assert t["loss"] == pytest.approx(20.7025, rel=1e-12)
    # TRL 1.x logs IPO's rewards and logps from the sums, as for sigmoid
    assert (t["rewards/chosen"], t["rewards/rejected"]) == (pytest.approx(0.1), pytest.approx(-0.1))
    assert (t["logps/chosen"], t["logps/rejected"]) == (-10.0, -12.0)


def test_orpo():
    # per-token means: pc = -10 / 4 = -2.5, pr = -12 / 5 = -2.4
    # log_odds = (pc - pr) - (log(1 - e^pc) - log(1 - e^pr)) = -0.1 - (-0.0856497 + 0.0951032) = -0.1094495
    # ratio = log s(log_odds) = -0.7493686; loss = -pc - 0.1 * ratio = 2.5 + 0.0749369
    pref = Preference("orpo", orpo_lambda=0.1)
    t = terms(pref, ref=None)
    assert t["loss"] == pytest.approx(2.5749368565368305, rel=1e-10)
    assert t["nll_loss"] == pytest.approx(2.5)
    assert t["log_odds_chosen"] == pytest.approx(-0.10944946678036467, rel=1e-10)
    assert t["log_odds_ratio"] == pytest.approx(-0.7493685653683033, rel=1e-10)
    assert (t["rewards/chosen"], t["rewards/rejected"]) == (pytest.approx(-0.25), pytest.approx(-0.24))  # lambda x means
    assert t["rewards/margins"] == pytest.approx(-0.01) and t["rewards/accuracies"] == 0.0
    assert (t["logps/chosen"], t["logps/rejected"]) == (pytest.approx(-2.5), pytest.approx(-2.4))
    assert sorted(t) == sorted(pref.metric_names)


@pytest.mark.parametrize("pref", [Preference("dpo", beta=0.1), Preference("dpo", beta=0.5, label_smoothing=0.2)],
                         ids=["sigmoid", "smoothed"])
def test_policy_equal_to_reference_gives_log2_and_zero_rewards(pref):
    seq = [-10.0, -12.0, -3.5, -7.25]
    out = numpy_terms(pref, seq, [4, 5, 2, 3], seq)
    np.testing.assert_allclose(out["loss"], [LOG2, LOG2], rtol=1e-15)
    assert LOG2 == math.log(2)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_array_equal(out[k], [0.0, 0.0], err_msg=k)  # a tie is not counted as right


def test_pairs_are_read_chosen_then_rejected_each():
    # two pairs, the second reversed: its rejected is the likelier one
    out = numpy_terms(Preference("dpo", beta=1.0), [-1.0, -3.0, -4.0, -2.0], [1, 1, 1, 1], [-2.0] * 4)
    np.testing.assert_allclose(out["rewards/margins"], [2.0, -2.0])
    np.testing.assert_array_equal(out["rewards/accuracies"], [1.0, 0.0])
    np.testing.assert_allclose(out["loss"], [math.log1p(math.exp(-2.0)), math.log1p(math.exp(2.0))], rtol=1e-12)


def test_dpo_without_the_reference_is_an_error_and_sft_has_no_preference():
    with pytest.raises(ValueError, match="reference"):
        numpy_terms(Preference("dpo"), SEQ, TOKENS, None)
    train = SimpleNamespace(objective="sft", beta=0.1, loss_type="sigmoid", label_smoothing=0.0, orpo_lambda=0.1)
    assert Preference.of(train) is None
    train.objective = "orpo"
    pref = Preference.of(train)
    assert not pref.uses_reference and pref.metric_names == ("loss", *METRICS, *ORPO_METRICS)
    assert Preference("dpo").metric_names == ("loss", *METRICS)
