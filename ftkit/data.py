"""Data: rows from files or the hub -> token ids with per-token loss masks -> padded, shifted batches.

Three formats: `text` ({"text"}), `completion` ({"prompt", "completion"}) and `chat` ({"messages"}).
A mask is per token: `mask[i] == 1` means predicting token i (from tokens < i) counts toward the loss,
so `mask[0]` never matters; `make_batch` does the shift.

The core must run without torch, mlx, `datasets` or pyarrow: the last two are imported only for a
hub id or a parquet file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ftkit.backend import Batch
from ftkit.errors import DataError, FtkitError
from ftkit.recipe import looks_like_hub_id

if TYPE_CHECKING:
    from ftkit.recipe import DataSection

SPLITS = ("train", "valid", "test")
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "val": "valid", "test": "test"}
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# "train.jsonl", and the shards `datasets` writes: "train-00000-of-00002.parquet".
_SPLIT_FILE = re.compile(r"^(train|valid|validation|dev|val|test)(-.+)?$", re.IGNORECASE)


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 where token i is a training target (its prediction counts toward the loss)
    truncated: bool = False


@dataclass
class Splits:
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    format: str  # "text" | "completion" | "chat"
    train_on: str  # resolved: "completion" | "all"
    n_truncated: dict[str, int] = field(default_factory=dict)  # per split, dropped examples included
    sources: dict[str, str] = field(default_factory=dict)  # per split: where its rows came from
    n_dropped: dict[str, int] = field(default_factory=dict)  # per split: examples with no target token


# ---------------------------------------------------------------- reading rows


@dataclass
class _Part:
    """One split's raw rows, each with the place an error message should name."""

    rows: list[dict]
    where: list[str]
    source: str

    def subset(self, idx: list[int], source: str) -> "_Part":
        return _Part([self.rows[i] for i in idx], [self.where[i] for i in idx], source)


def read_rows(data: "DataSection") -> dict[str, list[dict]]:
    """Split name ("train", "valid", "test") -> raw rows; missing splits are carved out of train or empty."""
    return {name: part.rows for name, part in _read_parts(data).items()}


def _read_parts(data: "DataSection") -> dict[str, _Part]:
    """Every split's rows, mapped into ftkit's formats by the recipe's column mapping (ftkit.mapping),
    and with data.mix: every source's, mixed."""
    from ftkit import mapping

    if data.mix:
        return mapping.read_mix(data, _read_source)
    return mapping.apply(_read_source(data), data)


def _read_source(data: "DataSection") -> dict[str, _Part]:
    path = Path(data.path).expanduser()
    if path.is_dir():
        parts = _read_folder(path)
    elif path.is_file():
        rows, where = _read_file(path)
        parts = {"train": _Part(rows, where, str(path))}
    elif looks_like_hub_id(data.path):
        parts = _read_hub(data)
    else:
        raise DataError(f"data.path: {data.path} does not exist (a folder, a data file, or a `datasets` hub id 'org/name').")
    if not parts["train"].rows:
        raise DataError(f"{parts['train'].source}: the training data has no rows.")
    return _hold_out(parts, data)


def _read_folder(folder: Path) -> dict[str, _Part]:
    files: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        m = _SPLIT_FILE.match(p.stem)
        if p.is_file() and p.suffix.lower() in EXTENSIONS and m:
            files.setdefault(SPLIT_NAMES[m.group(1).lower()], []).append(p)
    if "train" not in files:
        seen = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise DataError(
            f"{folder}: no training file. Expected train.jsonl (or .json, .csv, .tsv, .parquet), optionally "
            f"valid/validation/dev and test files beside it; found: {seen}."
        )
    parts = {}
    for split, paths in files.items():
        # Several files for one split are fine only as shards ("train-00000-of-00002"); "train.jsonl" next
        # to "train.csv", or "dev.jsonl" next to "valid.jsonl", is ambiguous.
        if len(paths) > 1 and not all("-" in p.stem for p in paths):
            raise DataError(f"{folder}: several files for the {split} split ({', '.join(p.name for p in paths)}); keep one.")
        rows, where = [], []
        for p in paths:
            r, w = _read_file(p)
            rows += r
            where += w
        parts[split] = _Part(rows, where, "; ".join(str(p) for p in paths))
    return parts


def _read_file(path: Path) -> tuple[list[dict], list[str]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ",")
        if suffix == ".parquet":
            return _read_parquet(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}).") from None
    raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(EXTENSIONS)}.")


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected one JSON object per line, got {type(row).__name__}.")
            rows.append(row)
            where.append(f"{path}:{n}")
    return rows, where


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name, as `datasets` writes them
            return _read_jsonl(path)
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
    rows = [obj] if isinstance(obj, dict) else obj
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a JSON list of objects, or JSON Lines.")
    return rows, [f"{path} row {i}" for i in range(1, len(rows) + 1)]


def _read_csv(path: Path, delimiter: str) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: Excel writes a BOM
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            for record in reader:
                if not any(cell.strip() for cell in record):
                    continue
                if len(record) != len(header):
                    raise DataError(f"{path}:{reader.line_num}: {len(record)} fields, but the header has {len(header)}.")
                rows.append(dict(zip(header, record)))
                where.append(f"{path}:{reader.line_num}")  # the record's last line, if a quoted field spans lines
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}.") from None
    return rows, where


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'ftkit[data]'.") from None
    rows = pq.read_table(path).to_pylist()
    return rows, [f"{path} row {i}" for i in range(1, len(rows) + 1)]


def _read_hub(data: "DataSection") -> dict[str, _Part]:
    name = data.path + (f" ({data.subset})" if data.subset else "")
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"{name}: not a local path; loading it from the hub needs `datasets`: pip install 'ftkit[data]'.") from None
    try:
        ds = load_dataset(data.path, data.subset)
    except Exception as e:  # hub, network and builder errors come in many types; the message is what helps
        raise DataError(f"{name}: could not load it with datasets.load_dataset: {e}") from None
    parts: dict[str, _Part] = {}
    for hub_split in ds:
        split = SPLIT_NAMES.get(hub_split.lower())
        if split is None or split in parts:
            continue
        source = f"{name}[{hub_split}]"
        rows = ds[hub_split].to_list()
        parts[split] = _Part(rows, [f"{source} row {i}" for i in range(1, len(rows) + 1)], source)
    if "train" not in parts:
        raise DataError(f"{name}: no train split among {list(ds)}.")
    return parts


def holdout_order(n: int, seed: int) -> list[int]:
    """Row indices 0..n-1 in a seeded order that depends only on (seed, index).

    A hash rather than an RNG, so the split is the same on every Python, numpy and platform.
    """
    return sorted(range(n), key=lambda i: hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest())


def _hold_out(parts: dict[str, _Part], data: "DataSection") -> dict[str, _Part]:
    """Carve the missing valid (and, if asked, test) split out of train; other missing splits are empty."""
    train = parts["train"]
    n = len(train.rows)
    sizes = {}
    for split, fraction in (("valid", data.valid_fraction), ("test", data.test_fraction)):
        if split not in parts and fraction > 0:
            sizes[split] = math.ceil(n * fraction)  # ceil, as datasets' train_test_split: never 0 when asked
    if sizes:
        if sum(sizes.values()) >= n:
            asked = ", ".join(f"data.{s}_fraction = {getattr(data, s + '_fraction')}" for s in sizes)
            raise DataError(f"{train.source}: {n} rows are too few to hold out {asked}; add the split's file or lower the fraction.")
        order, start, held = holdout_order(n, data.split_seed), 0, []
        # valid first: its rows then do not change when only test_fraction does.
        for split, size in sizes.items():
            fraction = getattr(data, f"{split}_fraction")
            idx = sorted(order[start : start + size])  # file order within a split
            parts[split] = train.subset(idx, f"{train.source} ({split}_fraction {fraction}, seed {data.split_seed})")
            start += size
            held.append(split)
        parts["train"] = train.subset(sorted(order[start:]), f"{train.source} (rest after holding out {' and '.join(held)})")
    for split in SPLITS:
        parts.setdefault(split, _Part([], [], "(none)"))
    return parts


# ---------------------------------------------------------------- format


def detect_format(rows: list[dict], data: "DataSection", where: str) -> str:
    if data.format != "auto":
        return data.format
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if data.messages_field in columns:
        return "chat"
    if data.prompt_field in columns and data.completion_field in columns:
        return "completion"
    if data.text_field in columns:
        return "text"
    raise DataError(
        f"{where}: cannot tell the data format from the columns {columns}. Chat data needs a "
        f"'{data.messages_field}' column, completion data '{data.prompt_field}' and '{data.completion_field}', "
        f"text data '{data.text_field}'. Map your columns with data.messages_field, data.prompt_field and "
        f"data.completion_field, or data.text_field (and set data.format to be explicit)."
    )


def resolve_train_on(train_on: str, fmt: str, response_template: str | None = None) -> str:
    """auto: the completion / assistant turns for completion and chat data; for text data, what follows
    data.response_template when one is set (why else set it), else every token."""
    if train_on != "auto":
        return train_on
    if fmt == "text":
        return "completion" if response_template else "all"
    return "completion"


# ---------------------------------------------------------------- encoding


def encode(row: dict, fmt: str, train_on: str, tokenizer: Any, data: "DataSection") -> Example:
    """One row -> ids and mask, truncated to data.max_seq_length (keeping the start).

    Errors name the key but not the row: `load_splits` adds where the row came from.
    """
    train_on = resolve_train_on(train_on, fmt, data.response_template)
    if fmt == "text":
        ids, mask = _encode_text(_string(row, data.text_field), train_on, tokenizer, data)
    elif fmt == "completion":
        prompt, completion = _string(row, data.prompt_field), _string(row, data.completion_field)
        ids, mask = _encode_completion(prompt, completion, train_on, tokenizer, data)
    elif fmt == "chat":
        ids, mask = _encode_chat(chat_messages(row, data), train_on, tokenizer, data)
    else:
        raise DataError(f"unknown data format {fmt!r}; use text, completion or chat.")
    if len(ids) > data.max_seq_length:
        return Example(ids[: data.max_seq_length], mask[: data.max_seq_length], truncated=True)
    return Example(ids, mask)


def _string(row: dict, key: str) -> str:
    if row.get(key) is None:
        raise DataError(f"missing key '{key}' (the row has {list(row)}).")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"'{key}' must be a string, got {type(value).__name__}: {value!r:.60}.")
    if not value.strip():
        raise DataError(f"'{key}' is empty.")
    return value


def _messages(row: dict, key: str) -> list[dict]:
    messages = row.get(key)
    if messages is None:
        raise DataError(f"missing key '{key}' (the row has {list(row)}).")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"'{key}' must be a non-empty list of {{role, content}} messages.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise DataError(f"'{key}' message {i}: needs a 'role' string.")
        if not isinstance(m.get("content"), str):
            raise DataError(f"'{key}' message {i} ({m['role']}): 'content' must be a string.")
    return messages


def chat_messages(row: dict, data: "DataSection") -> list[dict]:
    """A chat row's messages; a prompt/completion row becomes a user turn and the assistant's answer.
    data.system_prompt goes first where the conversation has no system message."""
    if row.get(data.messages_field) is None and isinstance(row.get(data.prompt_field), str):
        messages = [{"role": "user", "content": _string(row, data.prompt_field)},
                    {"role": "assistant", "content": _string(row, data.completion_field)}]
    else:
        messages = _messages(row, data.messages_field)
    if data.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": data.system_prompt}, *messages]
    return messages


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to append; set data.add_eos = false.")
    return tokenizer.eos_token_id


def _encode_text(text: str, train_on: str, tokenizer: Any, data: "DataSection") -> tuple[list[int], list[int]]:
    template = data.response_template if train_on == "completion" else None
    if train_on == "completion" and not template:
        raise DataError("train_on = 'completion' with text data needs data.response_template, or set data.train_on = 'all'.")
    if template is None:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        mask = [1] * len(ids)
    else:
        at = text.find(template)
        if at < 0:
            raise DataError(f"data.response_template {template!r} not found in the text.")
        ids, first = _ids_from_char(tokenizer, text, at + len(template))
        mask = [0] * first + [1] * (len(ids) - first)
    if data.add_eos and (not ids or ids[-1] != _eos_id(tokenizer)):
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return ids, mask


def _ids_from_char(tokenizer: Any, text: str, start: int) -> tuple[list[int], int]:
    """Token ids of `text`, and the first token that reaches past character `start`.

    Character offsets make this independent of how the marker happens to tokenize (TRL's collator
    matches template tokens, which misses when BPE merges across the marker's edge). A token straddling
    `start` counts as after it: it carries the first answer characters.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        first = next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > start), len(ids))
        return ids, first
    # Slow tokenizers have no offsets: count the prefix's tokens (can be off by one at a merge boundary).
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return ids, min(len(tokenizer(text[:start], add_special_tokens=True)["input_ids"]), len(ids))


def _encode_completion(prompt: str, completion: str, train_on: str, tokenizer: Any, data: "DataSection") -> tuple[list[int], list[int]]:
    # Token-level concatenation on purpose: generation feeds tokenizer(prompt), so training must see
    # the prompt tokenized the same way, not as part of prompt + completion.
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if data.add_eos and (not c or c[-1] != _eos_id(tokenizer)):
        c.append(tokenizer.eos_token_id)
    mask = [0] * len(p) + [1] * len(c) if train_on == "completion" else [1] * (len(p) + len(c))
    return p + c, mask


def _encode_chat(messages: list[dict], train_on: str, tokenizer: Any, data: "DataSection") -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; in completion mode only assistant turns are targets.

    An assistant turn's targets are its content plus the end-of-turn token(s) the template puts after
    it (`<|im_end|>` for ChatML); whitespace after the turn's last special token (ChatML's "\\n") is
    not a target, since generation stops at the end-of-turn token and never produces it.
    """
    style = data.chat_format
    if style == "auto" and not getattr(tokenizer, "chat_template", None):
        raise DataError("chat data needs a tokenizer with a chat template, and this one has none; set data.chat_format "
                        "(chatml, llama3, mistral, alpaca, phi, gemma), or use text or completion data.")
    text = _render(tokenizer, messages, generation_prompt=False, chat_format=style)
    ids = _tokens(tokenizer, text)
    if train_on == "all":
        mask = [1] * len(ids)
    else:
        mask = [0] * len(ids)
        spans = _assistant_spans_by_prefix(tokenizer, messages, ids, style)
        if spans is None:
            spans = _assistant_spans_by_offsets(tokenizer, messages, text, ids)
        for a, b in spans:
            mask[a:b] = [1] * (b - a)
    # A named format ends each turn itself (its end-of-turn marker is a target), as generation stops there.
    if style == "auto" and data.add_eos and not _ends_with_eos(tokenizer, ids):
        ids.append(_eos_id(tokenizer))
        mask.append(1 if train_on == "all" or messages[-1]["role"] == "assistant" else 0)
    return ids, mask


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, chat_format: str = "auto", whole: bool = True) -> str:
    """`whole`: a complete conversation (a named format may close it, as phi writes EOS); False for the
    partial renders that locate each turn."""
    if chat_format != "auto":
        from ftkit import chat_formats

        try:
            return chat_formats.render(messages, chat_format, tokenizer, generation_prompt, whole=whole)
        except FtkitError as e:
            raise DataError(str(e)) from None
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's raise_exception, e.g. "roles must alternate"
        raise DataError(f"the chat template rejected this conversation: {e}") from None


def chat_prompt_ids(messages: list[dict], chat_format: str, tokenizer: Any) -> list[int]:
    """The tokens generation feeds the model for a conversation: what a training example of it has before
    its last assistant turn's targets (the same render, the same tokenization)."""
    if chat_format == "auto" and not getattr(tokenizer, "chat_template", None):
        raise DataError("this tokenizer has no chat template; choose a prompt format (chatml, llama3, mistral, alpaca, phi, gemma).")
    return _tokens(tokenizer, _render(tokenizer, messages, generation_prompt=True, chat_format=chat_format))


def _tokens(tokenizer: Any, text: str) -> list[int]:
    # The template writes any BOS itself; this is what apply_chat_template(tokenize=True) does.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_ids(tokenizer: Any) -> set[int]:
    # all_special_ids misses tokens registered as special only in the tokenizer file (e.g. <|im_start|>).
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def _ends_with_eos(tokenizer: Any, ids: list[int]) -> bool:
    """The last token, ignoring trailing whitespace tokens, is EOS (ChatML's "<|im_end|>\\n" counts)."""
    eos = tokenizer.eos_token_id
    for i in reversed(ids):
        if i == eos:
            return True
        if tokenizer.decode([i]).strip():
            return False
    return False


def _trim_turn_end(tokenizer: Any, ids: list[int], a: int, b: int) -> int:
    """End of a turn's target span: drop whitespace-only tokens after the span's last special token."""
    special = _special_ids(tokenizer)
    last = next((j for j in range(b - 1, a - 1, -1) if ids[j] in special), None)
    if last is not None and all(not tokenizer.decode([ids[j]]).strip() for j in range(last + 1, b)):
        return last + 1
    return b


def _assistant_spans_by_prefix(tokenizer: Any, messages: list[dict], ids: list[int], chat_format: str = "auto") -> list[tuple[int, int]] | None:
    """Token spans of the assistant turns: for turn i, the tokens that rendering messages[:i+1] adds to
    messages[:i] + the generation prompt. None when the template lacks the prefix property."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = _tokens(tokenizer, _render(tokenizer, messages[:i], generation_prompt=True, chat_format=chat_format))
            upto = _tokens(tokenizer, _render(tokenizer, messages[: i + 1], generation_prompt=False, chat_format=chat_format, whole=False))
        except DataError:  # e.g. a template that refuses an empty or assistant-first prefix
            return None
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            return None
        spans.append((len(before), _trim_turn_end(tokenizer, upto, len(before), len(upto))))
    return spans


def _assistant_spans_by_offsets(tokenizer: Any, messages: list[dict], text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Fallback for templates whose partial renders are not prefixes of the full one (a message count in
    a header, earlier reasoning dropped, ...): find each message's content in the rendered text, in
    order, and take the tokens covering an assistant's content plus one special token right after it."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("this chat template needs character offsets to find the assistant turns, which only fast tokenizers give.")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if list(enc["input_ids"]) != ids:
        raise DataError("tokenizing the rendered conversation twice gave different ids.")
    special = _special_ids(tokenizer)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"].strip()  # templates often trim
        at = text.find(content, cursor) if content else -1
        if at < 0:
            if m["role"] == "assistant":
                raise DataError(f"assistant message {i}: its content is not in the conversation the chat template renders.")
            continue
        cursor = at + len(content)
        if m["role"] != "assistant":
            continue
        a = next(j for j, (_, end) in enumerate(offsets) if end > at)
        b = next((j for j in range(a, len(ids)) if offsets[j][0] >= cursor), len(ids))
        if b < len(ids) and ids[b] in special:
            b += 1
        spans.append((a, b))
    return spans


# ---------------------------------------------------------------- splits, batches, summary


def load_splits(data: "DataSection", tokenizer: Any) -> Splits:
    """The recipe's data as tokenized splits: from ftkit's token cache (memory-mapped, ftkit.token_cache)
    when data.cache is on and nothing they depend on changed; tokenized (and cached) otherwise."""
    if not data.cache:
        return tokenize_splits(data, tokenizer)
    from ftkit import token_cache

    return token_cache.load(data, tokenizer, tokenize_splits)


def tokenize_splits(data: "DataSection", tokenizer: Any) -> Splits:
    parts = _read_parts(data)
    fmt = detect_format(parts["train"].rows, data, parts["train"].source)
    train_on = resolve_train_on(data.train_on, fmt, data.response_template)
    if fmt == "text" and train_on == "completion" and not data.response_template:
        raise DataError(
            f"{parts['train'].source}: train_on = 'completion' with text data needs data.response_template "
            "(the marker after which the completion starts), or set data.train_on = 'all'."
        )
    out: dict[str, list[Example]] = {}
    n_truncated, n_dropped = {}, {}
    for split in SPLITS:
        part = parts[split]
        examples, truncated, dropped = [], 0, 0
        for i, (row, where) in enumerate(zip(part.rows, part.where)):
            try:
                ex = encode(row, fmt, train_on, tokenizer, data)
            except DataError as e:
                raise DataError(f"{where} ({split} row {i + 1}): {e}") from None
            truncated += ex.truncated
            if not any(ex.mask[1:]):  # mask[0] predicts nothing; such an example adds no loss
                dropped += 1
                continue
            examples.append(ex)
        if part.rows and not examples:
            raise DataError(
                f"{part.source}: none of the {len(part.rows)} {split} examples has a token to train on "
                f"(loss on {train_on}, max_seq_length {data.max_seq_length}). Check data.train_on, "
                "data.response_template, or raise data.max_seq_length."
            )
        out[split], n_truncated[split], n_dropped[split] = examples, truncated, dropped
    sources = {split: parts[split].source for split in SPLITS}
    return Splits(**out, format=fmt, train_on=train_on, n_truncated=n_truncated, sources=sources, n_dropped=n_dropped)


def check_batch(batch: Batch) -> Batch:
    if batch.n_targets == 0:
        raise DataError(
            f"a batch of {batch.inputs.shape[0]} examples has no target token: a batch whose mask is all zero "
            "is an error, not a silent no-op."
        )
    return batch


def make_batch(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded and shifted: inputs = ids[:-1], targets = ids[1:], mask = mask[1:]."""
    if not examples:
        raise DataError("make_batch: no examples.")
    pad = 0 if pad_id is None else int(pad_id)  # padding is masked out of loss and attention; any id works
    shape = (len(examples), max(max(len(e.ids) for e in examples) - 1, 0))
    inputs = np.full(shape, pad, dtype=np.int32)
    targets = np.full(shape, pad, dtype=np.int32)
    mask = np.zeros(shape, dtype=np.float32)
    attention = np.zeros(shape, dtype=np.int32)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        if n > 0:
            inputs[b, :n] = e.ids[:-1]
            targets[b, :n] = e.ids[1:]
            mask[b, :n] = e.mask[1:]
            attention[b, :n] = 1
    return check_batch(Batch(inputs, targets, mask, attention))


def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest rank: always one of the values (an actual example length)."""
    if not sorted_values:
        return 0
    return sorted_values[max(math.ceil(p / 100 * len(sorted_values)) - 1, 0)]


def summarize(splits: Splits, max_seq_length: int) -> dict:
    """Per split: count, token-length percentiles (after truncation), tokens, target tokens, truncated, dropped.

    `truncated` also counts examples longer than `max_seq_length` when that is lower than the one the
    splits were built with.
    """
    out = {}
    for split in SPLITS:
        examples = getattr(splits, split)
        lengths = sorted(len(e.ids) for e in examples)
        out[split] = {
            "count": len(examples),
            "p50": _percentile(lengths, 50),
            "p90": _percentile(lengths, 90),
            "p99": _percentile(lengths, 99),
            "max": lengths[-1] if lengths else 0,
            "tokens": sum(lengths),
            "target_tokens": sum(sum(e.mask[1:]) for e in examples),
            "truncated": splits.n_truncated.get(split, 0)
            + sum(1 for e in examples if not e.truncated and len(e.ids) > max_seq_length),
            "dropped": splits.n_dropped.get(split, 0),
        }
    return out
