"""The preference objectives (DPO, IPO, ORPO), written once for every array library.

A backend computes each sequence's summed target-token log-probability (policy, and for DPO the frozen
reference) and hands them to `pair_terms` with its own array functions (`Ops`): the formulas, the
rewards and the metrics are then the same on torch, MLX and numpy (validation and `ftkit eval` use numpy),
so the backends cannot drift apart. They follow TRL's DPOTrainer and ORPOTrainer:

- DPO, sigmoid (Rafailov et al. 2023): h = (pc - rc) - (pr - rr); loss = -(1 - ls) log s(b h) - ls log s(-b h),
  with `ls` the label smoothing (cDPO, as TRL 0.x's sigmoid loss; TRL 1.x's sigmoid ignores label_smoothing);
- IPO (Azar et al. 2023): h on per-token mean log-probs, loss = (h - 1 / (2 b))^2 (its rewards and logps stay
  sums, as TRL 1.x logs them);
- ORPO (Hong et al. 2024): reference-free; with per-token averaged policy log-probs,
  log_odds = (pc - pr) - (log(1 - e^pc) - log(1 - e^pr)), loss = -pc - lambda log s(log_odds).
  TRL (1.16, trl.experimental) averages the NLL term over the batch's chosen sequences' tokens, the prompt's
  included; here each pair's mean NLL over its chosen response's tokens is averaged over the pairs, which
  equals TRL's at one pair a batch with a one-token prompt (tests/test_trl_parity.py) and keeps the loss
  independent of how a step is cut into micro-batches (4 x 1 pair = 1 x 4 pairs).

Rewards are b * (policy - reference) (ORPO: b * policy, b = lambda), as TRL logs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

OBJECTIVES = ("sft", "dpo", "orpo")
PREFERENCE = ("dpo", "orpo")
LOSS_TYPES = ("sigmoid", "ipo")

# The per-pair values every preference step reports (summed over pairs; the report divides by the pairs).
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


@dataclass(frozen=True)
class Preference:
    objective: str  # "dpo" | "orpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    orpo_lambda: float = 0.1

    @classmethod
    def of(cls, train: Any) -> "Preference | None":
        """From a recipe's [train] section; None for plain SFT."""
        if train.objective not in PREFERENCE:
            return None
        return cls(train.objective, train.beta, train.loss_type, train.label_smoothing, train.orpo_lambda)

    @property
    def uses_reference(self) -> bool:
        return self.objective == "dpo"

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("loss", *METRICS, *(ORPO_METRICS if self.objective == "orpo" else ()))


@dataclass(frozen=True)
class Ops:
    """The few array functions the formulas need, in one array library."""

    log_sigmoid: Callable[[Any], Any]
    log1mexp: Callable[[Any], Any]  # log(1 - exp(x)) for x < 0
    greater: Callable[[Any, Any], Any]  # elementwise a > b as 0.0 / 1.0 floats
    stop_gradient: Callable[[Any], Any]


def _np_ops() -> Ops:
    import numpy as np

    return Ops(log_sigmoid=lambda x: -np.logaddexp(0.0, -x), log1mexp=lambda x: np.log(-np.expm1(x)),
               greater=lambda a, b: (a > b).astype(np.float64), stop_gradient=lambda x: x)


def pair_terms(ops: Ops, pref: Preference, chosen: Any, rejected: Any, chosen_tokens: Any, rejected_tokens: Any,
               ref_chosen: Any = None, ref_rejected: Any = None) -> dict[str, Any]:
    """Per-pair values ([pairs] arrays): "loss" (differentiable) and the metrics (gradient stopped).

    `chosen`/`rejected`: each sequence's summed target-token log-probability under the policy;
    `*_tokens`: its target-token count; `ref_*`: the same sums under the reference (DPO only)."""
    if pref.objective == "orpo":  # per-token means throughout: loss, rewards and logps (TRL's ORPOTrainer)
        chosen, rejected = chosen / chosen_tokens, rejected / rejected_tokens
    b, sg = pref.beta, ops.stop_gradient
    out: dict[str, Any] = {}
    if pref.objective == "dpo":
        if ref_chosen is None:
            raise ValueError("DPO needs the reference log-probabilities.")
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        if pref.loss_type == "ipo":
            per_token = (chosen - ref_chosen) / chosen_tokens - (rejected - ref_rejected) / rejected_tokens
            out["loss"] = (per_token - 1.0 / (2.0 * b)) ** 2
        else:
            ls = pref.label_smoothing
            out["loss"] = -(1.0 - ls) * ops.log_sigmoid(b * h) - ls * ops.log_sigmoid(-b * h)
        r_chosen, r_rejected = b * sg(chosen - ref_chosen), b * sg(rejected - ref_rejected)
    elif pref.objective == "orpo":
        log_odds = (chosen - rejected) - (ops.log1mexp(chosen) - ops.log1mexp(rejected))
        ratio = ops.log_sigmoid(log_odds)
        out["loss"] = -chosen - pref.orpo_lambda * ratio
        out["nll_loss"], out["log_odds_ratio"], out["log_odds_chosen"] = sg(-chosen), sg(ratio), sg(log_odds)
        b = pref.orpo_lambda
        r_chosen, r_rejected = b * sg(chosen), b * sg(rejected)
    else:
        raise ValueError(f"not a preference objective: {pref.objective!r}")
    out["rewards/chosen"], out["rewards/rejected"] = r_chosen, r_rejected
    out["rewards/accuracies"] = ops.greater(r_chosen, r_rejected)
    out["rewards/margins"] = r_chosen - r_rejected
    out["logps/chosen"], out["logps/rejected"] = sg(chosen), sg(rejected)
    return out


def numpy_terms(pref: Preference, seq_logps: Any, seq_tokens: Any, ref_logps: Any = None) -> dict[str, Any]:
    """`pair_terms` on host arrays of sequences ordered as a PairBatch's (2i: pair i's chosen, 2i + 1: its rejected)."""
    import numpy as np

    lp, n = np.asarray(seq_logps, np.float64), np.asarray(seq_tokens, np.float64)
    ref = None if ref_logps is None else np.asarray(ref_logps, np.float64)
    return pair_terms(_np_ops(), pref, lp[0::2], lp[1::2], n[0::2], n[1::2],
                      None if ref is None else ref[0::2], None if ref is None else ref[1::2])


LOG2 = math.log(2.0)  # DPO's loss when the policy equals the reference (sigmoid, no label smoothing)
