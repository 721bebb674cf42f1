"""The benchmark's three training sets, and the one count of trained tokens every tool is measured by.

- wikisql: the bundled WikiSQL `{"text"}` rows (varied lengths; loss on every token, as all three
  tools do for text data).
- chat: bench/data/chat, real single-turn `{"messages"}` conversations of varied length (loss on the
  assistant turn: ftkit's default, `mlx_lm lora --mask-prompt`, labels -100 in the Trainer baseline).
- packed: WikiSQL rows joined (EOS between them) and cut into rows of `packed_length` tokens: data
  that is already packed, where padding-free batching has nothing left to remove.

Each set holds exactly `Settings.examples` rows (a seeded draw), so every tool trains on each row
exactly once: one epoch of the same examples. The trained tokens of a run are then the target tokens of
those rows as ftkit's data pipeline tokenizes and masks them (non-padding tokens whose prediction
counts toward the loss), the same count for every tool; each tool's own count is kept beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
WIKISQL = REPO / "data" / "wikisql"
CHAT = REPO / "bench" / "data" / "chat"
FORMATS = {"wikisql": "text", "chat": "chat", "packed": "text"}


@dataclass
class BenchData:
    name: str
    format: str  # what ftkit detects and the baselines are told: text | chat
    folder: Path  # holds train.jsonl only: no tool validates inside the timed run
    examples: int
    target_tokens: int  # the reference count: sum over the rows of ftkit's loss mask
    tokens: int  # all tokens of the rows (targets, prompts, EOS)
    min_length: int
    median_length: int
    max_length: int
    input_lengths: list[int] = field(default_factory=list, repr=False)  # per row: the tokens the model reads (ids minus the last)
    flops: float | None = None  # model FLOPs of one pass over the rows (harness.flops), set by bench/speed.py

    @property
    def file(self) -> Path:
        return self.folder / "train.jsonl"

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "input_lengths"}, "folder": str(self.folder)}


def _rows(source: Path) -> list[str]:
    return [line for line in (source / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def _draw(lines: list[str], n: int, seed: int) -> list[str]:
    """n rows in a seeded order; the source is cycled (each pass reshuffled) when it has fewer."""
    out, epoch = [], 0
    while len(out) < n:
        out += [lines[i] for i in np.random.default_rng([seed, epoch]).permutation(len(lines))]
        epoch += 1
    return out[:n]


def _packed(tokenizer, n: int, length: int, seed: int) -> list[str]:
    """n `{"text"}` rows of about `length` tokens each, cut from the WikiSQL rows joined by EOS.

    Each row is decoded from `length - 1` token ids; every tool appends the EOS itself. Re-tokenizing
    decoded text can merge a token or two differently at a cut, so lengths vary by a few tokens.
    """
    stream: list[int] = []
    texts = [json.loads(line)["text"] for line in _draw(_rows(WIKISQL), len(_rows(WIKISQL)), seed)]
    rows, at, epoch = [], 0, 0
    while len(rows) < n:
        while len(stream) - at < length - 1:
            if not texts:
                epoch += 1
                texts = [json.loads(line)["text"] for line in _draw(_rows(WIKISQL), len(_rows(WIKISQL)), seed + epoch)]
            stream += list(tokenizer(texts.pop(0), add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        rows.append(json.dumps({"text": tokenizer.decode(stream[at : at + length - 1])}))
        at += length - 1
    return rows


def build(name: str, work: Path, model: Path, examples: int, packed_length: int, max_seq_length: int, seed: int = 0) -> BenchData:
    """Write the set's train.jsonl under `work` and count its tokens with ftkit's pipeline."""
    from ftkit.data.token_cache import load_splits
    from ftkit.models.tokenizer import load_tokenizer
    from ftkit.recipe.schema import DataSection

    if name not in FORMATS:
        raise SystemExit(f"bench: unknown data set {name!r}; choose from {', '.join(FORMATS)}.")
    tokenizer = load_tokenizer(model)
    suffix = f"-{packed_length}" if name == "packed" else ""
    folder = work / "data" / model.name / f"{name}{suffix}-n{examples}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    if name == "packed":
        lines = _packed(tokenizer, examples, packed_length, seed)
    else:
        lines = _draw(_rows(WIKISQL if name == "wikisql" else CHAT), examples, seed)
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # cache off: counting here must not warm (or fill) the token cache of the runs it is counting for
    section = DataSection(path=str(folder), format=FORMATS[name], valid_fraction=0.0, max_seq_length=max_seq_length, cache=False)
    splits = load_splits(section, tokenizer)
    train = splits.train
    if len(train) != examples or splits.n_truncated.get("train"):
        raise SystemExit(f"bench: {folder}: ftkit kept {len(train)} of {examples} rows ({splits.n_truncated.get('train')} truncated, "
                         f"{splits.n_dropped.get('train')} without targets); raise --max-seq-length so that no tool truncates.")
    lengths = sorted(len(e.ids) for e in train)
    return BenchData(name=name, format=FORMATS[name], folder=folder, examples=examples,
                     target_tokens=int(sum(sum(e.mask[1:]) for e in train)), tokens=sum(lengths),
                     min_length=lengths[0], median_length=lengths[len(lengths) // 2], max_length=lengths[-1],
                     input_lengths=[len(e.ids) - 1 for e in train])
