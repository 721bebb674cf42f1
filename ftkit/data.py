"""Data sets in -> token ids with loss masks -> padded batches.

Rows come from a folder of split files, one file split by `valid_fraction`, or a `datasets` hub id.
Three formats are detected: {"text"}, {"prompt", "completion"} and {"messages"} (chat).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftkit.backend import Batch
from ftkit.errors import DataError
from ftkit.recipe import DataSection

SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "dev", "val"), "test": ("test",)}
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 where token i is a training target
    truncated: bool = False


@dataclass
class Splits:
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    format: str
    train_on: str
    n_truncated: dict[str, int] = field(default_factory=dict)
    n_dropped: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- reading rows


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and path.read_text()[:1] != "["):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}.")
            row["__line__"] = n
            rows.append(row)
        return rows
    if suffix == ".json":
        return [dict(r, __line__=i + 1) for i, r in enumerate(json.loads(path.read_text()))]
    if suffix in (".csv", ".tsv"):
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            return [dict(r, __line__=i + 2) for i, r in enumerate(reader)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [dict(r, __line__=i + 1) for i, r in enumerate(pq.read_table(path).to_pylist())]
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}.")


def _find_split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            hits = [folder / f"{name}{s}" for s in SUFFIXES if (folder / f"{name}{s}").exists()]
            if hits:
                found[split] = hits[0]
                break
    return found


def _carve(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of rows, chosen by a seeded permutation, keeping file order in both parts."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    n_out = max(1, int(round(len(rows) * fraction)))
    held = set(np.random.default_rng(seed).permutation(len(rows))[:n_out].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def read_rows(data: DataSection) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """split -> rows, and split -> where they came from."""
    path = Path(data.path)
    if path.is_dir():
        files = _find_split_files(path)
        if "train" not in files:
            raise DataError(f"{path}: no train file (expected train.jsonl, train.csv, train.parquet ...).")
        rows = {split: _read_file(p) for split, p in files.items()}
        sources = {split: str(p) for split, p in files.items()}
    elif path.is_file():
        rows, sources = {"train": _read_file(path)}, {"train": str(path)}
    else:
        rows, sources = _read_hub(data)
    for split in ("train", "valid", "test"):
        rows.setdefault(split, [])
    if not rows["test"] and data.test_fraction > 0:
        rows["train"], rows["test"] = _carve(rows["train"], data.test_fraction, data.split_seed + 1)
        sources["test"] = f"{sources['train']} (test_fraction {data.test_fraction}, seed {data.split_seed})"
    if not rows["valid"] and data.valid_fraction > 0:
        rows["train"], rows["valid"] = _carve(rows["train"], data.valid_fraction, data.split_seed)
        sources["valid"] = f"{sources['train']} (valid_fraction {data.valid_fraction}, seed {data.split_seed})"
    for split in rows:
        for row in rows[split]:
            row.setdefault("__where__", sources.get(split, split))
    return rows, sources


def _read_hub(data: DataSection) -> tuple[dict[str, list[dict]], dict[str, str]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.path = {data.path!r} is not a local file or folder; reading hub data sets needs "
                        'the datasets package: pip install "ftkit[data]".') from None
    try:
        ds = datasets.load_dataset(data.path, data.subset)
    except Exception as e:  # the hub client raises many types; the message is what matters
        raise DataError(f"data.path = {data.path!r}: could not load it as a hub data set: {e}") from None
    rows, sources = {}, {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            if name in ds:
                rows[split] = [dict(r, __line__=i + 1) for i, r in enumerate(ds[name])]
                sources[split] = f"{data.path}[{name}]"
                break
    return rows, sources


# ---------------------------------------------------------------- formats and masks


def detect_format(rows: list[dict], data: DataSection, where: str) -> str:
    if data.format != "auto":
        return data.format
    keys = set(rows[0]) - {"__line__", "__where__"} if rows else set()
    if data.messages_field in keys:
        return "chat"
    if data.prompt_field in keys and data.completion_field in keys:
        return "completion"
    if data.text_field in keys:
        return "text"
    raise DataError(
        f"{where}: cannot tell the format from the columns {sorted(keys)}. Expected '{data.text_field}', "
        f"'{data.prompt_field}' + '{data.completion_field}', or '{data.messages_field}'; map your columns with "
        "data.text_field, data.prompt_field, data.completion_field or data.messages_field."
    )


def _field(row: dict, key: str, fmt: str) -> Any:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value):
        raise DataError(f"{row.get('__where__', '?')}: row {row.get('__line__', '?')}: {fmt} format needs a non-empty '{key}'.")
    return value


def _ids(enc: Any) -> list[int]:
    if isinstance(enc, dict) or hasattr(enc, "keys"):
        enc = enc["input_ids"]
    return list(enc)


def _with_eos(ids: list[int], mask: list[int], tokenizer, add: bool, target: int) -> None:
    eos = tokenizer.eos_token_id
    if add and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        mask.append(target)


def encode(row: dict, fmt: str, train_on: str, tokenizer, data: DataSection) -> Example:
    if fmt == "text":
        text = _field(row, data.text_field, fmt)
        enc = tokenizer(text, return_offsets_mapping=train_on == "completion")
        ids = list(enc["input_ids"])
        if train_on == "completion":
            at = text.find(data.response_template)
            if at < 0:
                raise DataError(f"{row['__where__']}: row {row['__line__']}: data.response_template "
                                f"{data.response_template!r} does not occur in the text.")
            start = at + len(data.response_template)
            # A token counts as completion when it starts after the template, whatever the boundaries.
            mask = [1 if s >= start and e > s else 0 for s, e in enc["offset_mapping"]]
        else:
            mask = [1] * len(ids)
        _with_eos(ids, mask, tokenizer, data.add_eos, 1)
    elif fmt == "completion":
        # Token-level concatenation: generation feeds exactly tokenizer(prompt).
        prompt = tokenizer(str(_field(row, data.prompt_field, fmt))).input_ids
        completion = tokenizer(str(_field(row, data.completion_field, fmt)), add_special_tokens=False).input_ids
        ids = list(prompt) + list(completion)
        mask = [0 if train_on == "completion" else 1] * len(prompt) + [1] * len(completion)
        _with_eos(ids, mask, tokenizer, data.add_eos, 1)
    elif fmt == "chat":
        ids, mask = _encode_chat(row, train_on, tokenizer, data)
    else:
        raise DataError(f"unknown data.format {fmt!r}")
    return Example(ids, mask)


def _encode_chat(row: dict, train_on: str, tokenizer, data: DataSection) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; assistant turns are targets in completion mode.

    data.add_eos does not apply: the template's own end-of-turn tokens end each turn. Each assistant turn's tokens are those that rendering messages[:i+1] adds to rendering messages[:i]
    with the generation prompt, so the header the model sees at generation time is never a target,
    while the content and the template's end-of-turn tokens are.
    """
    messages = _field(row, data.messages_field, "chat")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{row['__where__']}: chat data needs a tokenizer with a chat template; this one has none.")

    def render(msgs, gen):
        return _ids(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen))

    ids = render(messages, False)
    if train_on == "all":
        return ids, [1] * len(ids)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise DataError(f"{row['__where__']}: row {row['__line__']}: this chat template does not render "
                            "turns as a prefix of the conversation, so assistant turns cannot be located; "
                            "use data.train_on = 'all'.")
        for t in range(len(before), len(through)):
            mask[t] = 1
    return ids, mask  # no EOS appended: the chat template owns how turns end


def _resolve_train_on(data: DataSection, fmt: str) -> str:
    if data.train_on != "auto":
        if data.train_on == "completion" and fmt == "text" and not data.response_template:
            raise DataError(f"{data.path}: text data has no completion part; set data.response_template or data.train_on = 'all'.")
        return data.train_on
    if fmt == "text":
        return "completion" if data.response_template else "all"
    return "completion"


def load_splits(data: DataSection, tokenizer) -> Splits:
    rows, sources = read_rows(data)
    fmt = detect_format(rows["train"], data, sources.get("train", data.path))
    train_on = _resolve_train_on(data, fmt)
    out: dict[str, list[Example]] = {}
    truncated: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for split in ("train", "valid", "test"):
        examples, n_trunc, n_drop = [], 0, 0
        for row in rows[split]:
            ex = encode(row, fmt, train_on, tokenizer, data)
            if len(ex.ids) > data.max_seq_length:
                ex = Example(ex.ids[: data.max_seq_length], ex.mask[: data.max_seq_length], True)
                n_trunc += 1
            if sum(ex.mask[1:]) == 0:  # nothing to learn from: the first token is never predicted
                n_drop += 1
                continue
            examples.append(ex)
        if rows[split] and not examples:
            raise DataError(f"{sources.get(split, split)}: every {split} example has an empty loss mask "
                            f"(after truncation to data.max_seq_length = {data.max_seq_length}); raise it or check data.train_on.")
        out[split], truncated[split], dropped[split] = examples, n_trunc, n_drop
    return Splits(out["train"], out["valid"], out["test"], fmt, train_on, truncated, dropped, sources)


# ---------------------------------------------------------------- batches and summaries


def make_batch(examples: list[Example], pad_id: int) -> Batch:
    width = max(len(e.ids) for e in examples) - 1
    b = len(examples)
    inputs = np.full((b, width), pad_id, dtype=np.int32)
    targets = np.full((b, width), pad_id, dtype=np.int32)
    mask = np.zeros((b, width), dtype=np.float32)
    attn = np.zeros((b, width), dtype=np.int32)
    for i, e in enumerate(examples):
        n = len(e.ids) - 1
        inputs[i, :n] = e.ids[:-1]
        targets[i, :n] = e.ids[1:]
        mask[i, :n] = e.mask[1:]
        attn[i, :n] = 1
    batch = Batch(inputs, targets, mask, attn)
    if batch.n_targets == 0:
        raise DataError("a batch has no target tokens (its loss mask is all zero); it would train nothing.")
    return batch


def summarize(splits: Splits, max_seq_length: int) -> dict[str, dict[str, Any]]:
    out = {}
    for split in ("train", "valid", "test"):
        examples = getattr(splits, split)
        lengths = np.array([len(e.ids) for e in examples]) if examples else np.zeros(0)
        row: dict[str, Any] = {"count": len(examples), "truncated": splits.n_truncated.get(split, 0),
                               "dropped": splits.n_dropped.get(split, 0),
                               "target_tokens": int(sum(sum(e.mask[1:]) for e in examples))}
        if len(lengths):
            for p in (50, 90, 99):
                row[f"p{p}"] = int(np.percentile(lengths, p))
            row["max"] = int(lengths.max())
            row["tokens"] = int(lengths.sum())
        out[split] = row
    return out
