"""Token sampling in the core, over next-token logits from any backend: same seed, same output.

The sampler applies, in this order (as transformers and mlx-lm do): the repetition penalty over the
last `repetition_context_size` tokens (prompt included), temperature, top-k, top-p (nucleus), min-p
(tokens below min_p x the likeliest token's probability are dropped), then draws with a numpy
generator seeded once per call. Temperature 0 is greedy (after the repetition penalty).

`TextStream` turns tokens into text for the terminal: it stops at a stop string even when the string
spans several tokens or starts inside one, never prints any part of it, and holds back the tail that
could still become one (or an unfinished UTF-8 character) until it is sure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ftkit.backend.protocol import Backend
from ftkit.common.errors import FtkitError
from ftkit.data.encode import chat_prompt_ids


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages recent tokens (CTRL's rule)
    repetition_context_size: int = 20

    def check(self) -> "Sampling":
        problems = []
        if self.temperature < 0:
            problems.append(f"--temperature {self.temperature}: must be >= 0 (0 = greedy).")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p {self.top_p}: must be in (0, 1] (1 = off).")
        if self.top_k < 0:
            problems.append(f"--top-k {self.top_k}: must be >= 0 (0 = off).")
        if not 0 <= self.min_p < 1:
            problems.append(f"--min-p {self.min_p}: must be in [0, 1) (0 = off).")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty {self.repetition_penalty}: must be > 0 (1 = off).")
        if self.repetition_context_size < 1:
            problems.append(f"--repetition-context-size {self.repetition_context_size}: must be >= 1.")
        if problems:
            raise FtkitError(" ".join(problems))
        return self


def penalize(logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
    """CTRL's repetition penalty (Keskar et al. 2019): a recent token's positive logit is divided by the
    penalty, a negative one multiplied, once per distinct token."""
    if penalty == 1.0 or not recent:
        return logits
    out = logits.astype(np.float64, copy=True)
    idx = np.unique(np.asarray(recent, dtype=np.int64))
    idx = idx[(idx >= 0) & (idx < len(out))]
    vals = out[idx]
    out[idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def distribution(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The probabilities the sampler draws from (temperature > 0), after top-k, top-p and min-p."""
    z = logits.astype(np.float64) / s.temperature
    if 0 < s.top_k < len(z):
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < s.top_p  # the smallest set whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    if s.min_p > 0:
        p = np.where(p >= s.min_p * p.max(), p, 0.0)
        p /= p.sum()
    return p


def pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator, recent: list[int] | None = None) -> int:
    logits = penalize(logits, (recent or [])[-s.repetition_context_size:], s.repetition_penalty)
    if s.temperature <= 0:
        return int(np.argmax(logits))
    p = distribution(logits, s)
    return int(rng.choice(len(p), p=p))


def probability(logits: np.ndarray, token: int) -> float:
    """The model's own probability of `token` (softmax of the raw logits), what --colorize shows."""
    z = logits.astype(np.float64)
    z = z - z.max()
    return float(np.exp(z[token]) / np.exp(z).sum())


@dataclass
class Step:
    token: int
    prob: float


def steps(backend: Backend, prompt_ids: list[int], max_tokens: int, sampling: Sampling, stop_ids: set[int]) -> Iterator[Step]:
    """Generated tokens with the model's probability of each; a stop id ends the stream unyielded."""
    rng = np.random.default_rng(sampling.seed)
    history = list(prompt_ids)
    logits, state = backend.next_logits(list(prompt_ids), None)
    for _ in range(max_tokens):
        token = pick(logits, sampling, rng, history)
        if token in stop_ids:
            return
        yield Step(token, probability(logits, token))
        history.append(token)
        logits, state = backend.next_logits([token], state)


def generate(backend: Backend, prompt_ids: list[int], max_tokens: int, sampling: Sampling, stop_ids: set[int]) -> Iterator[int]:
    for step in steps(backend, prompt_ids, max_tokens, sampling, stop_ids):
        yield step.token


def stop_token_ids(tokenizer: Any, stop_strings: list[str]) -> set[int]:
    """EOS, and each stop string that is one whole token of this tokenizer (it ends generation before
    it is printed, without waiting for text)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for s in stop_strings:
        if s in vocab:
            ids.add(vocab[s])
    return ids


@dataclass
class TextStream:
    """Incremental detokenization with stop strings; each emitted piece carries its token's probability."""

    tokenizer: Any
    stops: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    text: str = ""  # everything decoded so far (stop string cut off once found)
    emitted: int = 0  # characters of `text` already handed out
    stopped: bool = False
    _bounds: list[tuple[int, float]] = field(default_factory=list)  # (end char, probability) per token

    def add(self, token: int, prob: float = 1.0) -> list[tuple[str, float]]:
        """Add a token; return the text that is now safe to show, in (piece, probability) parts."""
        if self.stopped:
            return []
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        self._bounds.append((len(full), prob))
        self.text = full
        cut = self._first_stop(full)
        if cut is not None:
            self.text, self.stopped = full[:cut], True
            return self._emit(cut)
        safe = len(full) - self._held(full)
        return self._emit(safe)

    def finish(self) -> list[tuple[str, float]]:
        """The held-back tail, once no more tokens come."""
        return self._emit(len(self.text))

    def _first_stop(self, full: str) -> int | None:
        start = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stops if s) if i >= 0]
        return min(hits) if hits else None

    def _held(self, full: str) -> int:
        """Characters at the end to hold back: an unfinished UTF-8 character, or a stop string's start."""
        if full.endswith("\ufffd"):
            return len(full) - self.emitted
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(full)), longest, -1):
                if full.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, upto: int) -> list[tuple[str, float]]:
        upto = max(upto, self.emitted)
        parts, start = [], self.emitted
        for end, prob in self._bounds:
            if end <= start:
                continue
            piece_end = min(end, upto)
            if piece_end > start:
                parts.append((self.text[start:piece_end], prob))
                start = piece_end
            if start >= upto:
                break
        self.emitted = upto
        return parts


@dataclass
class Completion:
    text: str  # without the stop string
    tokens: int  # generated, the stop token not counted
    finish: str  # "stop" (EOS or a stop string), or "length" (max_tokens)
    probs: list[float]


def complete(backend: Backend, tokenizer: Any, prompt_ids: list[int], max_tokens: int, sampling: Sampling,
             stops: list[str], on_text=None) -> Completion:
    """Generate until EOS, a stop string or max_tokens; `on_text` gets each piece as it becomes safe to show."""
    if max_tokens < 1:
        raise FtkitError(f"--max-tokens {max_tokens}: must be >= 1 (the most tokens to generate).")
    if not prompt_ids:
        raise FtkitError("the prompt has no tokens: give some text with --prompt (or build one with --loom).")
    stream = TextStream(tokenizer, [s for s in stops if s])
    probs: list[float] = []
    for step in steps(backend, prompt_ids, max_tokens, sampling.check(), stop_token_ids(tokenizer, stops)):
        probs.append(step.prob)
        parts = stream.add(step.token, step.prob)
        if on_text and parts:
            on_text(parts)
        if stream.stopped:
            break
    tail = stream.finish()
    if on_text and tail:
        on_text(tail)
    finish = "length" if len(probs) >= max_tokens and not stream.stopped else "stop"
    return Completion(stream.text, len(probs), finish, probs)


def prompt_ids(tokenizer: Any, fmt: str, text: str | None = None, messages: list[dict] | None = None,
               system: str | None = None) -> list[int]:
    """The prompt's tokens as training examples of the same format have them before their answer.

    `fmt` "none": the text as completion data's prompt (the tokenizer's own special tokens, e.g. BOS);
    "auto" or a named format: a conversation (the text as one user turn), ending with the assistant's header."""

    if fmt == "none":
        if text is None:
            text = "\n\n".join(m["content"] for m in messages or [])
        if system:
            text = f"{system}\n\n{text}"
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    messages = list(messages) if messages is not None else [{"role": "user", "content": text or ""}]
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    return chat_prompt_ids(messages, fmt, tokenizer)


BANDS = ((0.8, "bold green"), (0.6, "green"), (0.4, "yellow"), (0.2, "dark_orange"), (0.0, "red"))


def band_style(prob: float) -> str:
    return next(style for low, style in BANDS if prob >= low)


def legend() -> str:
    """Rich markup: which colour is which probability band."""
    cells, upper = [], 100
    for low, style in BANDS:
        cells.append(f"[{style}]\u2588\u2588 {int(low * 100)}-{upper}%[/]")
        upper = int(low * 100)
    return "token probability: " + "  ".join(cells)
