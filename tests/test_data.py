"""Data loading, format detection, loss masks (against hand-computed expectations), splits, batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ftkit.data import Example, detect_format, load_splits, make_batch, read_rows, summarize
from ftkit.errors import DataError
from ftkit.recipe import DataSection


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def section(path, **kw) -> DataSection:
    return DataSection(path=str(path), **kw)


def masked_text(tok, ex: Example) -> str:
    return tok.decode([t for t, m in zip(ex.ids, ex.mask) if m])


def test_detects_the_three_formats_and_csv(tmp_path):
    assert detect_format([{"text": "a"}], section(tmp_path), "x") == "text"
    assert detect_format([{"prompt": "a", "completion": "b"}], section(tmp_path), "x") == "completion"
    assert detect_format([{"messages": []}], section(tmp_path), "x") == "chat"
    assert detect_format([{"q": "a", "a": "b"}], section(tmp_path, prompt_field="q", completion_field="a"), "x") == "completion"
    with pytest.raises(DataError) as e:
        detect_format([{"question": "a", "answer": "b"}], section(tmp_path), "f.jsonl")
    assert "['answer', 'question']" in str(e.value) and "data.prompt_field" in str(e.value)
    (tmp_path / "train.csv").write_text("prompt,completion\nWhat is 2+2?,4\nCapital of France?,Paris\n")
    rows, sources = read_rows(section(tmp_path, valid_fraction=0))
    assert [r["completion"] for r in rows["train"]] == ["4", "Paris"] and sources["train"].endswith("train.csv")


def test_completion_mask_is_exactly_the_completion_plus_eos(tmp_path, tokenizer):
    f = jsonl(tmp_path / "train.jsonl", [{"prompt": "Q: how many rows?\nA:", "completion": " SELECT COUNT(*) FROM t"}])
    s = load_splits(section(f, valid_fraction=0), tokenizer)
    (ex,) = s.train
    prompt_ids = tokenizer("Q: how many rows?\nA:").input_ids
    completion_ids = tokenizer(" SELECT COUNT(*) FROM t", add_special_tokens=False).input_ids
    assert ex.ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert ex.mask == [0] * len(prompt_ids) + [1] * (len(completion_ids) + 1)
    assert s.format == "completion" and s.train_on == "completion"
    s_all = load_splits(section(f, valid_fraction=0, train_on="all"), tokenizer)
    assert s_all.train[0].mask == [1] * len(ex.ids)


def test_chat_masks_only_assistant_turns(tmp_path, tokenizer):
    conv = [
        {"role": "system", "content": "You write SQL."},
        {"role": "user", "content": "count rows"},
        {"role": "assistant", "content": "SELECT COUNT(*) FROM t"},
        {"role": "user", "content": "and the names?"},
        {"role": "assistant", "content": "SELECT name FROM t"},
    ]
    f = jsonl(tmp_path / "train.jsonl", [{"messages": conv}, {"messages": conv[1:3]}])
    s = load_splits(section(f, valid_fraction=0), tokenizer)
    multi, single = s.train
    assert s.format == "chat"
    # hand-computed: each assistant content followed by the template's end-of-turn marker and newline
    assert masked_text(tokenizer, multi) == "SELECT COUNT(*) FROM t<|im_end|>\nSELECT name FROM t<|im_end|>\n"
    assert masked_text(tokenizer, single) == "SELECT COUNT(*) FROM t<|im_end|>\n"
    # the unmasked part is everything else, in order: system and user turns and the assistant headers
    full = tokenizer.apply_chat_template(conv, tokenize=False)
    assert tokenizer.decode(multi.ids) == full
    unmasked = tokenizer.decode([t for t, m in zip(multi.ids, multi.mask) if not m])
    assert unmasked == full.replace("SELECT COUNT(*) FROM t<|im_end|>\n", "").replace("SELECT name FROM t<|im_end|>\n", "")


def test_response_template_masks_text_after_the_marker(tmp_path, tokenizer, wikisql_dir):
    rows = [json.loads(x) for x in (wikisql_dir / "train.jsonl").read_text().splitlines()[:3]]
    f = jsonl(tmp_path / "train.jsonl", rows)
    s = load_splits(section(f, valid_fraction=0, response_template="\nA:", train_on="completion"), tokenizer)
    for row, ex in zip(rows, s.train):
        answer = row["text"].split("\nA:", 1)[1]
        assert masked_text(tokenizer, ex) == answer + "<|im_end|>"
    bad = jsonl(tmp_path / "bad.jsonl", [{"text": "no marker here"}])
    with pytest.raises(DataError, match="response_template"):
        load_splits(section(bad, valid_fraction=0, response_template="\nA:"), tokenizer)


def test_splits_are_seeded_disjoint_and_sized(tmp_path, tokenizer):
    f = jsonl(tmp_path / "all.jsonl", [{"text": f"row {i}"} for i in range(100)])
    a, _ = read_rows(section(f, valid_fraction=0.2, test_fraction=0.1, split_seed=1))
    b, _ = read_rows(section(f, valid_fraction=0.2, test_fraction=0.1, split_seed=1))
    c, _ = read_rows(section(f, valid_fraction=0.2, test_fraction=0.1, split_seed=2))
    texts = lambda rows: [r["text"] for r in rows]  # noqa: E731
    assert all(texts(a[k]) == texts(b[k]) for k in a)
    assert texts(a["valid"]) != texts(c["valid"])
    assert (len(a["train"]), len(a["valid"]), len(a["test"])) == (72, 18, 10)
    assert len(set(texts(a["train"])) | set(texts(a["valid"])) | set(texts(a["test"]))) == 100


def test_folder_with_dev_split(tmp_path):
    jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    jsonl(tmp_path / "dev.jsonl", [{"text": "c"}])
    rows, sources = read_rows(section(tmp_path))
    assert len(rows["train"]) == 2 and len(rows["valid"]) == 1 and sources["valid"].endswith("dev.jsonl")


def test_truncation_is_counted_and_all_zero_masks_are_errors(tmp_path, tokenizer, wikisql_dir):
    s = load_splits(section(wikisql_dir, max_seq_length=64), tokenizer)
    assert s.n_truncated["train"] > 0 and all(len(e.ids) <= 64 for e in s.train)
    summary = summarize(s, 64)
    assert summary["train"]["truncated"] == s.n_truncated["train"] and summary["train"]["max"] == 64
    # a completion that is cut off entirely leaves nothing to learn: every example -> an error
    f = jsonl(tmp_path / "train.jsonl", [{"prompt": "word " * 50, "completion": "x"}])
    with pytest.raises(DataError, match="empty loss mask"):
        load_splits(section(f, valid_fraction=0, max_seq_length=16), tokenizer)
    with pytest.raises(DataError, match="all zero"):
        make_batch([Example([1, 2, 3], [1, 0, 0])], pad_id=0)


def test_bad_rows_name_the_file_and_line(tmp_path, tokenizer):
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        read_rows(section(f))
    g = jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}])
    with pytest.raises(DataError, match=r"g.jsonl: row 2: .*'completion'"):
        load_splits(section(g, valid_fraction=0), tokenizer)


def test_make_batch_shifts_and_pads():
    b = make_batch([Example([1, 2, 3, 4], [0, 0, 1, 1]), Example([5, 6], [0, 1])], pad_id=9)
    np.testing.assert_array_equal(b.inputs, [[1, 2, 3], [5, 9, 9]])
    np.testing.assert_array_equal(b.targets, [[2, 3, 4], [6, 9, 9]])
    np.testing.assert_array_equal(b.mask, [[0, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(b.attention_mask, [[1, 1, 1], [1, 0, 0]])
    assert b.n_targets == 3 and b.n_tokens == 4 and b.inputs.dtype == np.int32


def test_summary_on_a_hand_made_set(tmp_path, tokenizer):
    from ftkit.data import Splits

    s = Splits([Example([1] * n, [0] + [1] * (n - 1)) for n in (10, 20, 30, 40)], [], [], "text", "all", {"train": 1})
    row = summarize(s, 64)["train"]
    assert row["count"] == 4 and row["max"] == 40 and row["p50"] == 25 and row["tokens"] == 100
    assert row["target_tokens"] == 96 and row["truncated"] == 1
