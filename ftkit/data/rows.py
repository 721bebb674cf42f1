"""Data: rows from files or the hub -> token ids with per-token loss masks -> padded, shifted batches.

Four formats: `text` ({"text"}), `completion` ({"prompt", "completion"}), `chat` ({"messages"}) and
`preference` ({"prompt", "chosen", "rejected"}: pairs for DPO and ORPO, ftkit.data.preference).
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ftkit.common.errors import DataError
from ftkit.common.hub import looks_like_hub_id
from ftkit.common.suggest import missing_path

if TYPE_CHECKING:
    from ftkit.recipe.schema import DataSection


SPLITS = ("train", "valid", "test")


SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "val": "valid", "test": "test"}


EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


# "train.jsonl", and the shards `datasets` writes: "train-00000-of-00002.parquet".
_SPLIT_FILE = re.compile(r"^(train|valid|validation|dev|val|test)(-.+)?$", re.IGNORECASE)


@dataclass
class Part:
    """One split's raw rows, each with the place an error message should name."""

    rows: list[dict]
    where: list[str]
    source: str

    def subset(self, idx: list[int], source: str) -> "Part":
        return Part([self.rows[i] for i in idx], [self.where[i] for i in idx], source)


def read_source(data: "DataSection") -> dict[str, Part]:
    path = Path(data.path).expanduser()
    if path.is_dir():
        parts = _read_folder(path)
    elif path.is_file():
        rows, where = _read_file(path)
        parts = {"train": Part(rows, where, str(path))}
    elif looks_like_hub_id(data.path):
        parts = _read_hub(data)
    else:
        raise DataError(f"data.path: {data.path} does not exist: no such file or folder (a folder, a data file, or a "
                        f"`datasets` hub id 'org/name').{missing_path(data.path)}")
    if not parts["train"].rows:
        raise DataError(f"{parts['train'].source}: the training data has no rows.")
    return _hold_out(parts, data)


def _read_folder(folder: Path) -> dict[str, Part]:
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
        parts[split] = Part(rows, where, "; ".join(str(p) for p in paths))
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
    except UnicodeDecodeError:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8-sig")
            at = None
        except UnicodeDecodeError as e:
            at = e.start
        line = raw[:at].count(b"\n") + 1 if at is not None else None
        place = f"{path}:{line}" if line else str(path)
        byte = f" (byte {raw[at]:#04x})" if at is not None else ""
        raise DataError(f"{place}: not UTF-8 text{byte}; save the file as UTF-8 (e.g. iconv -f cp1252 -t utf-8).") from None
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
        import pyarrow.parquet as pq  # lazy: optional extra
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'ftkit[data]'.") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError; a cut file an OSError
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:200]}): cut short or damaged? "
                        "Write or download it again.") from None
    return rows, [f"{path} row {i}" for i in range(1, len(rows) + 1)]


def _read_hub(data: "DataSection") -> dict[str, Part]:
    name = data.path + (f" ({data.subset})" if data.subset else "")
    try:
        from datasets import load_dataset  # lazy: optional extra
    except ImportError:
        raise DataError(f"{name}: not a local path; loading it from the hub needs `datasets`: pip install 'ftkit[data]'.") from None
    try:
        ds = load_dataset(data.path, data.subset)
    except Exception as e:  # hub, network and builder errors come in many types; the message is what helps
        raise DataError(f"{name}: could not load it with datasets.load_dataset: {e}") from None
    parts: dict[str, Part] = {}
    for hub_split in ds:
        split = SPLIT_NAMES.get(hub_split.lower())
        if split is None or split in parts:
            continue
        source = f"{name}[{hub_split}]"
        rows = ds[hub_split].to_list()
        parts[split] = Part(rows, [f"{source} row {i}" for i in range(1, len(rows) + 1)], source)
    if "train" not in parts:
        raise DataError(f"{name}: no train split among {list(ds)}.")
    return parts


def holdout_order(n: int, seed: int) -> list[int]:
    """Row indices 0..n-1 in a seeded order that depends only on (seed, index).

    A hash rather than an RNG, so the split is the same on every Python, numpy and platform.
    """
    return sorted(range(n), key=lambda i: hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest())


def _hold_out(parts: dict[str, Part], data: "DataSection") -> dict[str, Part]:
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
        parts.setdefault(split, Part([], [], "(none)"))
    return parts


def detect_format(rows: list[dict], data: "DataSection", where: str) -> str:
    if data.format != "auto":
        return data.format
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if data.chosen_field in columns and data.rejected_field in columns:
        return "preference"
    if data.messages_field in columns:
        return "chat"
    if data.prompt_field in columns and data.completion_field in columns:
        return "completion"
    if data.text_field in columns:
        return "text"
    raise DataError(
        f"{where}: cannot tell the data format from the columns {columns}. Chat data needs a "
        f"'{data.messages_field}' column, completion data '{data.prompt_field}' and '{data.completion_field}', "
        f"text data '{data.text_field}', preference data '{data.chosen_field}' and '{data.rejected_field}' (with "
        f"'{data.prompt_field}' or '{data.messages_field}'). Map your columns with data.messages_field, data.prompt_field and "
        f"data.completion_field, data.text_field, or data.chosen_field and data.rejected_field (and set data.format to be explicit)."
    )
