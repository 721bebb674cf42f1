"""`ftkit eval` on preference data: how often a model puts the chosen response above the rejected one.

Per pair, from each response's summed log-probability given the prompt (the same numbers DPO trains on):
accuracy counts the pairs whose chosen response is more likely (TRL's rewards/accuracies measures the same
against a reference; here it is the model's own preference, so the base and the adapter compare directly),
accuracy per token compares the per-token means (long responses are not penalised for their length), and
the loss and perplexity are the chosen responses' token-weighted NLL, as `ftkit eval` reports for SFT data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ftkit.backend.protocol import Backend
from ftkit.data.batch import Pair
from ftkit.data.batching import micro_batches


def preference_scores(backend: Backend, pairs: Sequence[Pair], batch_size: int, pad_id: int | None, packing: bool) -> dict[str, Any]:
    logps, tokens = [], []
    for batch in micro_batches(pairs, batch_size, pad_id, packing):
        logps.append(backend.sequence_logps(batch))
        tokens.append(batch.tokens_per_sequence)
    lp, n = np.concatenate(logps), np.concatenate(tokens)
    chosen, rejected = lp[0::2], lp[1::2]
    loss = float(-chosen.sum() / n[0::2].sum())
    return {
        "loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "preference_accuracy": float((chosen > rejected).mean()),
        "preference_accuracy_per_token": float((chosen / n[0::2] > rejected / n[1::2]).mean()),
        "logps_chosen": float(chosen.mean()), "logps_rejected": float(rejected.mean()),
        "margin": float((chosen - rejected).mean()),
    }
