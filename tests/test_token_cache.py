"""The token cache: tokenize once, read memory-mapped, and never reuse an entry that no longer fits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ftkit.data import token_cache
from ftkit.data.encode import tokenize_splits
from ftkit.data.token_cache import load_splits
from ftkit.recipe.schema import DataSection


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def counting(calls: list):
    def tokenize(data, tokenizer):
        calls.append(data.max_seq_length)
        return tokenize_splits(data, tokenizer)
    return tokenize


def test_a_second_load_reads_the_cache_and_gives_the_same_examples(cache, small_data, tokenizer):
    data = DataSection(path=str(small_data), max_seq_length=64)
    calls: list = []
    first = token_cache.load(data, tokenizer, counting(calls))
    again = token_cache.load(data, tokenizer, counting(calls))
    assert calls == [64]  # tokenized once
    plain = tokenize_splits(data, tokenizer)
    for split in ("train", "valid", "test"):
        assert list(getattr(again, split)) == list(getattr(plain, split)) == list(getattr(first, split))
    assert again.n_truncated == plain.n_truncated and again.format == plain.format and again.sources == plain.sources
    assert isinstance(again.train.tokens, np.memmap)  # mapped, not read into memory
    assert again.train[1:3] == plain.train[1:3] and again.train[-1] == plain.train[-1]
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_what_the_tokens_depend_on_makes_a_new_entry(cache, small_data, tokenizer, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    calls: list = []
    data = DataSection(path=str(small_data), max_seq_length=64)
    token_cache.load(data, tokenizer, counting(calls))
    token_cache.load(DataSection(path=str(small_data), max_seq_length=32), tokenizer, counting(calls))  # a key
    train = small_data / "train.jsonl"
    rows = train.read_text().splitlines()
    train.write_text("\n".join(rows[:-1]) + "\n")  # a data file
    token_cache.load(data, tokenizer, counting(calls))
    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the tokenizer's template
    token_cache.load(data, other, counting(calls))
    assert calls == [64, 32, 64, 64]
    assert len(token_cache.load(data, tokenizer, counting(calls)).train) == len(rows) - 1 and len(calls) == 4


def test_load_splits_uses_the_cache_unless_the_recipe_turns_it_off(cache, small_data, tokenizer):
    load_splits(DataSection(path=str(small_data)), tokenizer)
    assert len(list(cache.iterdir())) == 1
    load_splits(DataSection(path=str(small_data), cache=False), tokenizer)
    assert len(list(cache.iterdir())) == 1


def test_a_data_error_writes_no_entry(cache, tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(Exception, match="bad.jsonl:2"):
        load_splits(DataSection(path=str(bad), valid_fraction=0), tokenizer)
    assert not cache.exists() or not list(cache.iterdir())


def test_a_large_split_costs_no_memory_until_read(cache, tmp_path, tokenizer):
    # 200k short examples: the mapped arrays are on disk; reading one example touches a page.
    from ftkit.data.batch import Example, Splits

    n = 200_000
    examples = [Example([i % 500, 7, 8, 9], [0, 1, 1, 1]) for i in range(n)]
    splits = Splits(examples, [], [], format="text", train_on="all")
    folder = cache / "probe"
    token_cache._store(folder, splits)
    store = token_cache.TokenStore(folder, "train")
    assert len(store) == n and store[123_456] == examples[123_456]
    assert (folder / "train.tokens.npy").stat().st_size >= n * 4 * 4
    assert isinstance(store.offsets, np.memmap) and store.lengths().sum() == 4 * n
    assert os.path.getsize(folder / "meta.json") < 1000
