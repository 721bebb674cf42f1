"""Token sampling in the core, over next-token logits from any backend: same seed, same output."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ftkit.backend import Backend


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


def pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k > 0:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < s.top_p  # the smallest set whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def generate(backend: Backend, prompt_ids: list[int], max_tokens: int, sampling: Sampling, stop_ids: set[int]) -> Iterator[int]:
    rng = np.random.default_rng(sampling.seed)
    logits, state = backend.next_logits(prompt_ids, None)
    for _ in range(max_tokens):
        token = pick(logits, sampling, rng)
        if token in stop_ids:
            return
        yield token
        logits, state = backend.next_logits([token], state)
