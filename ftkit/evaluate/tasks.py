"""Task metrics for `ftkit eval`: classification, multiple choice and generation, on any backend.

Scoring goes through the backend contract only (`row_losses` for log-likelihoods, a batch of
candidates at a time; `next_logits` for generation), so it is the same on torch and MLX. A candidate
answer (a label, a choice) is scored by putting it where the row's completion was and encoding the row
exactly as training does: its
log-likelihood is minus the loss on its target tokens (the answer and the EOS or end-of-turn token
after it, so a label that is a prefix of another is not favoured). Generation starts from the same
tokens a training example has before its answer.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftkit.common.errors import FtkitError
from ftkit.data import chat_formats
from ftkit.data.batch import make_batch
from ftkit.data.encode import encode
from ftkit.data.mapping import Mapper
from ftkit.evaluate.generate import Sampling, complete

UNMATCHED = "(unmatched)"


# Candidates scored per forward pass: the rows, and their padded tokens (the logits of the targets only, on torch).
LOGLIK_ROWS, LOGLIK_TOKENS = 32, 4096


def accuracy(gold: list[Any], pred: list[Any]) -> float:
    if not gold:
        return float("nan")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def macro_f1(gold: list[str], pred: list[str]) -> float:
    """Unweighted mean of per-class F1 over the classes that occur as gold or prediction (as
    scikit-learn's f1_score(average="macro")); an unmatched answer counts as a miss of its gold class
    and is no class of its own."""
    classes = sorted(set(gold) | (set(pred) - {UNMATCHED}))
    if not classes:
        return float("nan")
    scores = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def top_confusions(gold: list[str], pred: list[str], n: int) -> list[dict[str, Any]]:
    """The most frequent (gold, predicted) pairs that differ; ties in first-seen order."""
    counts = Counter((g, p) for g, p in zip(gold, pred) if g != p)
    return [{"gold": g, "predicted": p, "count": c} for (g, p), c in counts.most_common(n)]


def normalize_text(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_SQL_PUNCT = re.compile(r"\s*([(),=<>!*])\s*")


def normalize_sql(s: str) -> str:
    """Case and spacing do not change a query: lower case, one space between tokens, none around
    punctuation and operators, no trailing semicolon."""
    s = " ".join(s.strip().rstrip(";").lower().split())
    return _SQL_PUNCT.sub(r"\1", s)


NORMALIZERS = {"text": normalize_text, "sql": normalize_sql}


def classification_metrics(gold: list[str], pred: list[str], n_confusions: int) -> dict[str, Any]:
    return {"examples": len(gold), "accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred),
            "top_confusions": top_confusions(gold, pred, n_confusions)}


def choice_metrics(gold: list[int], pred: list[int]) -> dict[str, Any]:
    return {"examples": len(gold), "accuracy": accuracy(gold, pred)}


def generation_metrics(gold: list[str], pred: list[str], normalize: str) -> dict[str, Any]:
    norm = NORMALIZERS[normalize]
    return {"examples": len(gold), "exact_match": accuracy([g.strip() for g in gold], [p.strip() for p in pred]),
            "normalized_exact_match": accuracy([norm(g) for g in gold], [norm(p) for p in pred]), "normalize": normalize}


def match_answer(text: str, candidates: list[str]) -> int | None:
    """Which candidate a generated answer is: equal after normalising case, spacing and end punctuation,
    else the longest candidate it starts with (the model went on after the label); None if none."""
    def norm(s: str) -> str:
        return " ".join(s.lower().split()).strip(string.punctuation + " ")

    t = norm(text)
    normed = [norm(c) for c in candidates]
    if t in normed:
        return normed.index(t)
    starts = [(len(c), i) for i, c in enumerate(normed) if c and t.startswith(c) and t[len(c):len(c) + 1] in ("", " ")]
    return max(starts)[1] if starts else None


@dataclass
class Scorer:
    """Encodes rows like training does and scores them on a loaded backend."""

    backend: Any
    tokenizer: Any
    data: Any  # the task's DataSection
    fmt: str

    def with_completion(self, row: dict, completion: str) -> dict:
        row = dict(row)
        field = self.data.messages_field
        if isinstance(row.get(field), list):
            msgs = [dict(m) for m in row[field]]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            msgs[last]["content"] = completion
            row[field] = msgs
        else:
            row[self.data.completion_field] = completion
        return row

    def encode(self, row: dict):

        return encode(row, self.fmt, "completion", self.tokenizer, self.data)

    def fits(self, row: dict) -> bool:
        """Whether the row, answer included, fits in data.max_seq_length (training drops or cuts the others)."""
        return not self.encode(row).truncated

    def logliks(self, groups: list[list[dict]]) -> list[list[tuple[float, int]] | None]:
        """Per group (one example's candidates): (log-likelihood of the targets, target tokens) of each
        row, or None when one of the group's rows does not fit. Rows of similar length share a batch."""

        encoded = [[self.encode(row) for row in group] for group in groups]
        fitting = [all(not ex.truncated for ex in group) for group in encoded]
        flat = [ex for group, ok in zip(encoded, fitting) if ok for ex in group]
        scores = np.zeros(len(flat))
        for take in _length_batches([len(ex.ids) for ex in flat]):
            scores[take] = -self.backend.row_losses(make_batch([flat[i] for i in take], self.tokenizer.pad_token_id))
        out: list[list[tuple[float, int]] | None] = []
        k = 0
        for group, ok in zip(encoded, fitting):
            out.append([(float(scores[k + j]), int(sum(ex.mask[1:]))) for j, ex in enumerate(group)] if ok else None)
            k += len(group) if ok else 0
        return out

    def prompt_ids(self, row: dict) -> list[int]:
        """The tokens before the row's answer: what generation feeds the model."""
        ex = self.encode(row)
        first = next((i for i, m in enumerate(ex.mask) if m and i > 0), None)
        if first is None:
            raise FtkitError("a row has no answer tokens to generate after (raise data.max_seq_length).")
        return ex.ids[:first]

    def gold_text(self, row: dict) -> str:
        d = self.data
        if isinstance(row.get(d.messages_field), list):
            return next(m["content"] for m in reversed(row[d.messages_field]) if m["role"] == "assistant")
        if isinstance(row.get(d.completion_field), str):
            return row[d.completion_field]
        text = row.get(d.text_field)
        if isinstance(text, str) and d.response_template and d.response_template in text:
            return text[text.index(d.response_template) + len(d.response_template):]
        raise FtkitError("generation eval needs rows with a completion, an assistant turn, or text with data.response_template.")

    def generate(self, row: dict, max_tokens: int, stops: list[str]) -> str:

        return complete(self.backend, self.tokenizer, self.prompt_ids(row), max_tokens, Sampling(), stops).text


def _length_batches(lengths: list[int]) -> list[list[int]]:
    """Indices in batches of similar lengths (little padding), at most LOGLIK_ROWS rows and about
    LOGLIK_TOKENS padded tokens each (one row more when a single row is longer)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and len(batches[-1]) < LOGLIK_ROWS and (len(batches[-1]) + 1) * lengths[i] <= LOGLIK_TOKENS:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def default_stops(scorer: Scorer, golds: list[str]) -> list[str]:

    stops = chat_formats.stop_strings(scorer.data.chat_format, scorer.tokenizer) if scorer.fmt == "chat" else []
    if not any("\n" in g.strip() for g in golds):
        stops.append("\n")  # one-line answers: the line ends the answer
    return stops


def pick_best(scores: list[tuple[float, int]], length_normalize: bool) -> int:
    values = [s / n if length_normalize else s for s, n in scores]
    return max(range(len(values)), key=values.__getitem__)


def run_task(scorer: Scorer, task, rows: list[dict], label_set: list[str] | None, n_confusions: int,
             where: str) -> dict[str, Any]:
    """One task's metrics on these rows (already mapped: `_gold`, `_raw`)."""

    settings, kind = task.settings, task.kind
    if not rows:
        return {"task": kind, "examples": 0}
    mapper = Mapper(task.spec, task.name)
    samples = []
    fitting = [r for r in rows if scorer.fits(r)]
    skipped = {"too_long": len(rows) - len(fitting)} if len(fitting) < len(rows) else {}
    rows = fitting
    if kind == "generation":
        golds = [scorer.gold_text(r).strip() for r in rows]
        stops = settings.stop if settings.stop is not None else default_stops(scorer, golds)
        preds = [scorer.generate(r, settings.max_tokens, stops).strip() for r in rows]
        samples = [{"gold": g, "predicted": p} for g, p in zip(golds, preds)]
        return {"task": kind, **generation_metrics(golds, preds, settings.normalize), **_skipped(skipped), "samples": samples[:5]}
    gold, pred = [], []
    stops, names, cands = None, [], []
    pending = []  # loglik: (gold, label names, candidate rows) per example, scored in batches below
    for i, r in enumerate(rows):
        cands, names = mapper.candidates(r, f"{where} row {i + 1}", label_set)
        g = names.index(r["_gold"]) if kind == "classification" else r["_gold"]
        if kind == "classification" and settings.scoring == "generate":
            if stops is None:
                stops = settings.stop if settings.stop is not None else default_stops(scorer, cands)
            text = scorer.generate(r, settings.max_tokens, stops)
            p = match_answer(text, cands)
            samples.append({"gold": names[g], "generated": text})
            gold.append(names[g])
            pred.append(names[p] if p is not None else UNMATCHED)
        else:
            pending.append((g, names, [scorer.with_completion(r, c) for c in cands]))
    for (g, names_of, _), scores in zip(pending, scorer.logliks([group for *_, group in pending])):
        if scores is None:  # a longer candidate does not fit where the right one does: not a fair comparison
            skipped["too_long"] = skipped.get("too_long", 0) + 1
            continue
        p = pick_best(scores, settings.length_normalize)
        gold.append(names_of[g] if kind == "classification" else g)
        pred.append(names_of[p] if kind == "classification" else p)
    if kind == "classification":
        out = {"task": kind, "scoring": settings.scoring, "labels": len(names),
               **classification_metrics(gold, pred, n_confusions), **_skipped(skipped)}
        if settings.scoring == "generate":
            out["unmatched"] = sum(p == UNMATCHED for p in pred)  # answers that are no label at all
            out["samples"] = samples[:5]
        return out
    return {"task": kind, "choices": len(cands), **choice_metrics(gold, pred), **_skipped(skipped)}


def _skipped(skipped: dict[str, int]) -> dict[str, Any]:
    """Rows left out because the prompt and answer exceed data.max_seq_length, as training leaves them out."""
    return {"skipped_too_long": skipped["too_long"]} if skipped.get("too_long") else {}
