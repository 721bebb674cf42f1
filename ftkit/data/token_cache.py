"""Tokenized splits cached on disk and memory-mapped: tokenize once, and keep memory flat as data grows.

Each split is three flat arrays (`tokens` int32, `masks` int8, `offsets` int64) plus a truncation
flag per example, saved as .npy files that `np.load(mmap_mode="r")` maps without reading: a run over
a million examples holds the pages it touches, not a million Python lists. numpy's memory map rather
than Arrow because the core must run without pyarrow; the layout is Arrow's (values + offsets).

The cache key covers everything the tokens depend on: the resolved [data] section, the size and
modification time of every file it names, the tokenizer (vocabulary, special tokens, chat template,
and how it encodes a probe string), and ftkit's encoding version. Entries are written to a temporary
folder and renamed into place, so a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.markup import escape

from ftkit.common import distributed
from ftkit.common.atomic import atomic_dir
from ftkit.common.console import console
from ftkit.common.fingerprints import fingerprint_tokenizer
from ftkit.common.hub import looks_like_hub_id
from ftkit.common.paths import cache_root
from ftkit.data.batch import Example, Pair, Splits
from ftkit.data.preference import FORMAT as PREFERENCE
from ftkit.data.preference import longest, sequences, tokenize
from ftkit.data.rows import SPLITS
from ftkit.data.stats import notes
from ftkit.models.folder import CONFIG, context_length, context_problem

if TYPE_CHECKING:
    from ftkit.recipe.schema import DataSection


# Bump when encoding changes what a row turns into (or what an entry records), so older entries are not reused.
ENCODING_VERSION = 2


_PROBE = "Hello, world!\n  Two  spaces\tand a tab. <|im_start|>user\nÜnïcödé 123"


class TokenStore(Sequence[Example]):
    """One split's examples, read from memory-mapped arrays on access."""

    def __init__(self, folder: Path, split: str):
        load = lambda name: np.load(folder / f"{split}.{name}.npy", mmap_mode="r")  # noqa: E731
        self.tokens, self.masks, self.offsets, self.truncated = load("tokens"), load("masks"), load("offsets"), load("truncated")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._item(i)

    def _item(self, i: int) -> Example:
        return self._sequence(i)

    def _sequence(self, i: int) -> Example:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Example(self.tokens[a:b].tolist(), self.masks[a:b].tolist(), bool(self.truncated[i]))

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class PairStore(TokenStore):
    """A preference split: its pairs' sequences interleaved in TokenStore's arrays (2i: pair i's chosen, 2i + 1
    its rejected), so the arrays (and data fingerprints over them) read as the flat sequence list does."""

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // 2

    def _item(self, i: int) -> Pair:  # type: ignore[override]
        chosen, rejected = self._sequence(2 * i), self._sequence(2 * i + 1)
        return Pair(chosen, rejected, truncated=chosen.truncated or rejected.truncated)

    def lengths(self) -> np.ndarray:
        """Each pair's tokens, both sequences (len(Pair.ids), as length grouping measures a pair)."""
        return np.diff(self.offsets).reshape(-1, 2).sum(axis=1)

    def longest(self) -> np.ndarray:
        return np.diff(self.offsets).reshape(-1, 2).max(axis=1)


def _write_split(folder: Path, split: str, examples: Sequence[Example]) -> None:
    lengths = np.fromiter((len(e.ids) for e in examples), dtype=np.int64, count=len(examples))
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=np.int32)
    masks = np.empty(int(offsets[-1]), dtype=np.int8)
    for e, a, b in zip(examples, offsets[:-1], offsets[1:]):
        tokens[a:b] = e.ids
        masks[a:b] = e.mask
    truncated = np.fromiter((e.truncated for e in examples), dtype=bool, count=len(examples))
    for name, arr in (("tokens", tokens), ("masks", masks), ("offsets", offsets), ("truncated", truncated)):
        np.save(folder / f"{split}.{name}.npy", arr)


def _files(value: Any) -> Iterator[Path]:
    """Every existing file a recipe value names: itself, or all files under a folder."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _files(v)
    elif isinstance(value, list):
        for v in value:
            yield from _files(v)
    elif isinstance(value, str) and value and len(value) < 4096:
        p = Path(value).expanduser()
        try:
            if p.is_file():
                yield p
            elif p.is_dir():
                yield from (f for f in sorted(p.rglob("*")) if f.is_file())
        except OSError:
            return


def tokenizer_key(tokenizer: Any) -> str:

    probe = list(tokenizer(_PROBE)["input_ids"])
    parts = [fingerprint_tokenizer(tokenizer), type(tokenizer).__name__, getattr(tokenizer, "chat_template", None) or "",
             tokenizer.eos_token_id, tokenizer.pad_token_id, probe]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def cache_key(data: Any, tokenizer: Any) -> str:
    section = json.loads(data.model_dump_json())
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _files(section)]
    parts = [ENCODING_VERSION, section, stats, tokenizer_key(tokenizer)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_dir() -> Path:

    return cache_root() / "tokens"


def load(data: Any, tokenizer: Any, tokenize: Callable[[Any, Any], Splits]) -> Splits:
    """The tokenized splits from the cache, tokenizing with `tokenize` (and caching) on a miss.

    Hub data sets are not cached here: their rows can change under the same id, and `datasets` keeps
    its own cache of them.
    """

    if not Path(data.path).expanduser().exists() and looks_like_hub_id(data.path):
        return tokenize(data, tokenizer)
    folder = cache_dir() / cache_key(data, tokenizer)
    if not (folder / "meta.json").is_file():
        splits = tokenize(data, tokenizer)  # errors in the data surface here, before anything is written
        _store(folder, splits)
    meta = json.loads((folder / "meta.json").read_text())
    store = PairStore if meta["format"] == PREFERENCE else TokenStore
    stores = {split: store(folder, split) for split in SPLITS}
    return Splits(**stores, format=meta["format"], train_on=meta["train_on"], n_truncated=meta["n_truncated"],
                  sources=meta["sources"], n_dropped=meta["n_dropped"], lengths=meta.get("lengths", {}),
                  dropped_where=meta.get("dropped_where", {}), n_prompt_cut=meta.get("n_prompt_cut", {}))


def _store(folder: Path, splits: Splits) -> None:
    # keep_existing: another process (a rank of the same run) may put the same entry in place first.
    with atomic_dir(folder, keep_existing=True) as tmp:
        for split in SPLITS:
            _write_split(tmp, split, sequences(getattr(splits, split)))  # a pair: its chosen, then its rejected
        meta = {"format": splits.format, "train_on": splits.train_on, "n_truncated": splits.n_truncated,
                "sources": splits.sources, "n_dropped": splits.n_dropped, "lengths": splits.lengths,
                "dropped_where": splits.dropped_where, "n_prompt_cut": splits.n_prompt_cut}
        (tmp / "meta.json").write_text(json.dumps(meta))


def load_splits(data: "DataSection", tokenizer: Any, quiet: bool = False) -> Splits:
    """The recipe's data as tokenized splits: from ftkit's token cache (memory-mapped, ftkit.token_cache)
    when data.cache is on and nothing they depend on changed; tokenized (and cached) otherwise.

    Either way, what the data does that the recipe does not say is printed (unless `quiet`), from the
    splits themselves, so a rerun whose tokens are cached says it as the first run did: examples cut to
    data.max_seq_length, examples left out, an empty valid file, and a data.max_seq_length beyond the
    model's context (with the examples that are longer than it). A warning, not an error: transformers
    itself only warns, RoPE models run past their config's max_position_embeddings (worse, not broken),
    and the recipe may be meant for a longer-context model than the one it runs on now."""
    splits = tokenize(data, tokenizer) if not data.cache else load(data, tokenizer, tokenize)
    context = model_context(tokenizer)
    limit = context_length(context[1]) if context is not None else None
    said = [] if quiet else notes(splits, data, limit[0] if limit else None)
    if not quiet and context is not None and limit is not None and data.max_seq_length > limit[0]:
        longer = {split: int(np.sum(np.asarray(_lengths(getattr(splits, split))) > limit[0])) for split in SPLITS}
        problem = context_problem(*context, data.max_seq_length, longer, "max_seq_length" in data.model_fields_set)
        if problem:
            said.append(problem)
    if said and distributed.current().is_main:
        for line in said:
            console().print(f"[yellow]warning:[/] data: {escape(line)}", highlight=False)
    return splits


def model_context(tokenizer: Any) -> tuple[Path, dict] | None:
    """(model folder, its config) for a tokenizer loaded from a model folder (ftkit.models.tokenizer), else None."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if not folder.name or not (folder / CONFIG).is_file():
        return None
    try:
        return folder, json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _lengths(examples: Sequence[Example] | Sequence[Pair]) -> Sequence[int]:
    """Each example's tokens; a pair's longer sequence (what must fit the model's context)."""
    if isinstance(examples, PairStore):
        return examples.longest()
    return examples.lengths() if isinstance(examples, TokenStore) else longest(examples)
