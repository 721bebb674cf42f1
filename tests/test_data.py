"""Reading, format detection, loss masks (against hand-computed expectations), splits, batches, summary."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from builders import SHARED

from ftkit.common.errors import DataError
from ftkit.data.batch import Example, Splits, make_batch
from ftkit.data.encode import encode
from ftkit.data.mapping import read_rows
from ftkit.data.rows import detect_format
from ftkit.data.stats import summarize
from ftkit.data.token_cache import load_splits
from ftkit.recipe.schema import DataSection

CONV = [
    {"role": "system", "content": "You write SQL."},
    {"role": "user", "content": "count rows"},
    {"role": "assistant", "content": "SELECT COUNT(*) FROM t"},
    {"role": "user", "content": "and the names?"},
    {"role": "assistant", "content": "SELECT name FROM t"},
]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def section(path, **kw) -> DataSection:
    return DataSection(path=str(path), **kw)


def target_runs(ex: Example) -> list[list[int]]:
    """The ids of each contiguous run of mask == 1."""
    runs, current = [], []
    for t, m in zip(ex.ids, ex.mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# ---------------------------------------------------------------- reading and formats


def test_detects_the_three_formats(tmp_path):
    d = section(tmp_path)
    assert detect_format([{"text": "a"}], d, "x") == "text"
    assert detect_format([{"prompt": "a", "completion": "b"}], d, "x") == "completion"
    assert detect_format([{"messages": [], "text": "a"}], d, "x") == "chat"  # messages wins
    assert detect_format([{"q": "a", "a": "b"}], section(tmp_path, prompt_field="q", completion_field="a"), "x") == "completion"
    assert detect_format([{"q": "a"}], section(tmp_path, format="text"), "x") == "text"  # explicit: no detection


def test_unknown_columns_list_what_was_found_and_the_mapping_keys(tmp_path):
    with pytest.raises(DataError) as e:
        detect_format([{"question": "a", "answer": "b"}], section(tmp_path), "f.jsonl")
    msg = str(e.value)
    assert msg.startswith("f.jsonl:") and "['question', 'answer']" in msg
    assert all(k in msg for k in ("data.text_field", "data.prompt_field", "data.completion_field", "data.messages_field"))


def test_csv_folder_is_read_and_detected(tmp_path, tokenizer):
    (tmp_path / "train.csv").write_text('prompt,completion\nWhat is 2+2?,4\n"Capital, of France?",Paris\n\n')
    (tmp_path / "validation.csv").write_text("prompt,completion\nWhat is 3+3?,6\n")
    rows = read_rows(section(tmp_path))
    assert rows["train"] == [{"prompt": "What is 2+2?", "completion": "4"}, {"prompt": "Capital, of France?", "completion": "Paris"}]
    assert rows["valid"] == [{"prompt": "What is 3+3?", "completion": "6"}] and rows["test"] == []
    s = load_splits(section(tmp_path), tokenizer)
    assert s.format == "completion" and len(s.train) == 2 and s.sources["valid"].endswith("validation.csv")


def test_real_tsv_with_a_dev_split_and_mapped_column():
    if not (SHARED / "data" / "sst2").is_dir():
        pytest.skip("shared sst2 data not present")
    d = section(SHARED / "data" / "sst2", text_field="content")
    rows = read_rows(d)
    assert (len(rows["train"]), len(rows["valid"]), len(rows["test"])) == (67349, 872, 1821)
    assert set(rows["valid"][0]) == {"label", "content"} and detect_format(rows["valid"], d, "dev.tsv") == "text"


def test_json_list_and_parquet(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert read_rows(section(tmp_path / "a.json", valid_fraction=0))["train"] == [{"text": "x"}, {"text": "y"}]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "b.parquet")
    assert read_rows(section(tmp_path / "b.parquet", valid_fraction=0))["train"] == [{"text": "p"}, {"text": "q"}]


def test_bad_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:3: not valid JSON"):
        read_rows(section(f))


def test_missing_or_empty_field_names_file_line_and_key(tmp_path, tokenizer):
    g = jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": " "}])
    with pytest.raises(DataError, match=r"g\.jsonl:2 \(train row 2\): 'completion' is empty"):
        load_splits(section(g, valid_fraction=0), tokenizer)
    (tmp_path / "h.csv").write_text("text,label\nfine,1\n,0\n")
    with pytest.raises(DataError, match=r"h\.csv:3 .*'text' is empty"):
        load_splits(section(tmp_path / "h.csv", valid_fraction=0), tokenizer)
    k = jsonl(tmp_path / "k.jsonl", [{"text": "a"}, {"txt": "b"}])
    with pytest.raises(DataError, match=r"k\.jsonl:2 .*missing key 'text'"):
        load_splits(section(k, valid_fraction=0), tokenizer)


# ---------------------------------------------------------------- masks


def test_text_rows_train_on_every_token_plus_eos(tokenizer, wikisql_dir):
    s = load_splits(section(wikisql_dir), tokenizer)
    assert (s.format, s.train_on, len(s.train), len(s.valid), len(s.test)) == ("text", "all", 1000, 100, 100)
    first = json.loads((wikisql_dir / "train.jsonl").read_text().splitlines()[0])["text"]
    assert s.train[0].ids == tokenizer(first).input_ids + [tokenizer.eos_token_id]
    assert s.train[0].mask == [1] * len(s.train[0].ids)


def test_completion_mask_is_exactly_the_completion_plus_eos(tmp_path, tokenizer):
    f = jsonl(tmp_path / "train.jsonl", [{"prompt": "Q: how many rows?\nA:", "completion": " SELECT COUNT(*) FROM t"}])
    s = load_splits(section(f, valid_fraction=0), tokenizer)
    (ex,) = s.train
    p = tokenizer("Q: how many rows?\nA:").input_ids
    c = tokenizer(" SELECT COUNT(*) FROM t", add_special_tokens=False).input_ids
    assert ex.ids == p + c + [tokenizer.eos_token_id]
    assert ex.mask == [0] * len(p) + [1] * (len(c) + 1)
    assert (s.format, s.train_on) == ("completion", "completion")
    assert load_splits(section(f, valid_fraction=0, train_on="all"), tokenizer).train[0].mask == [1] * len(ex.ids)
    no_eos = load_splits(section(f, valid_fraction=0, add_eos=False), tokenizer).train[0]
    assert no_eos.ids == p + c


def test_chat_two_turns_masks_the_assistant_content_and_end_of_turn(tokenizer, tmp_path):
    f = jsonl(tmp_path / "train.jsonl", [{"messages": CONV[1:3]}])
    s = load_splits(section(f, valid_fraction=0), tokenizer)
    (ex,) = s.train
    assert (s.format, s.train_on) == ("chat", "completion")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the conversation as the template renders it, no second EOS after "<|im_end|>\n"
    assert tokenizer.decode(ex.ids) == "<|im_start|>user\ncount rows<|im_end|>\n<|im_start|>assistant\nSELECT COUNT(*) FROM t<|im_end|>\n"
    assert target_runs(ex) == [tokenizer("SELECT COUNT(*) FROM t", add_special_tokens=False).input_ids + [im_end]]
    assert [tokenizer.decode(r) for r in target_runs(ex)] == ["SELECT COUNT(*) FROM t<|im_end|>"]
    assert ex.mask[-1] == 0  # the newline after <|im_end|>


def test_chat_multi_turn_masks_each_assistant_turn_only(tokenizer):
    ex = encode({"messages": CONV}, "chat", "auto", tokenizer, section("x"))
    assert [tokenizer.decode(r) for r in target_runs(ex)] == ["SELECT COUNT(*) FROM t<|im_end|>", "SELECT name FROM t<|im_end|>"]
    full = tokenizer.apply_chat_template(CONV, tokenize=False)
    assert tokenizer.decode(ex.ids) == full
    # everything else -- system, user turns, assistant headers, newlines -- carries no loss
    unmasked = tokenizer.decode([t for t, m in zip(ex.ids, ex.mask) if not m])
    assert unmasked == full.replace("SELECT COUNT(*) FROM t<|im_end|>", "").replace("SELECT name FROM t<|im_end|>", "")
    assert encode({"messages": CONV}, "chat", "all", tokenizer, section("x")).mask == [1] * len(ex.ids)


def test_chat_template_without_the_prefix_property_falls_back_to_offsets(tokenizer):
    # A header counting the messages makes every partial render differ from the full one.
    counting = copy.copy(tokenizer)
    counting.chat_template = "{{ messages|length }} messages\n" + tokenizer.chat_template
    ex = encode({"messages": CONV}, "chat", "completion", counting, section("x"))
    assert counting.decode(ex.ids).startswith("5 messages\n")
    assert [counting.decode(r) for r in target_runs(ex)] == ["SELECT COUNT(*) FROM t<|im_end|>", "SELECT name FROM t<|im_end|>"]


def test_response_template_masks_text_after_the_marker(tmp_path, tokenizer, wikisql_dir):
    rows = [json.loads(x) for x in (wikisql_dir / "train.jsonl").read_text().splitlines()[:5]]
    f = jsonl(tmp_path / "train.jsonl", rows)
    s = load_splits(section(f, valid_fraction=0, response_template="\nA:"), tokenizer)
    assert s.train_on == "completion"  # auto + a response_template
    for row, ex in zip(rows, s.train):
        (run,) = target_runs(ex)
        assert tokenizer.decode(run) == row["text"].split("\nA:", 1)[1] + "<|im_end|>"
        assert ex.mask[: len(ex.mask) - len(run)] == [0] * (len(ex.mask) - len(run))  # a suffix, after the marker
    bad = jsonl(tmp_path / "bad.jsonl", rows[:2] + [{"text": "no marker here"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:3 \(train row 3\): data\.response_template '\\nA:' not found"):
        load_splits(section(bad, valid_fraction=0, response_template="\nA:"), tokenizer)


# ---------------------------------------------------------------- splits, truncation, empty masks


def test_held_out_splits_are_seeded_disjoint_and_sized(tmp_path):
    f = jsonl(tmp_path / "all.jsonl", [{"text": f"row {i}"} for i in range(100)])
    texts = lambda rows: [r["text"] for r in rows]  # noqa: E731
    a = read_rows(section(f, valid_fraction=0.2, test_fraction=0.1, split_seed=1))
    b = read_rows(section(f, valid_fraction=0.2, test_fraction=0.1, split_seed=1))
    c = read_rows(section(f, valid_fraction=0.2, test_fraction=0.1, split_seed=2))
    assert all(texts(a[k]) == texts(b[k]) for k in a)
    assert set(texts(a["valid"])) != set(texts(c["valid"]))
    assert (len(a["train"]), len(a["valid"]), len(a["test"])) == (70, 20, 10)
    assert len(set(texts(a["train"])) | set(texts(a["valid"])) | set(texts(a["test"]))) == 100
    # file order is kept within each split; valid does not move when only test_fraction changes
    assert texts(a["valid"]) == sorted(texts(a["valid"]), key=lambda t: int(t.split()[1]))
    assert texts(read_rows(section(f, valid_fraction=0.2, split_seed=1))["valid"]) == texts(a["valid"])
    with pytest.raises(DataError, match="too few"):
        read_rows(section(jsonl(tmp_path / "one.jsonl", [{"text": "x"}])))


def test_split_sources_and_missing_test(tmp_path, tokenizer):
    f = jsonl(tmp_path / "data.jsonl", [{"text": f"row {i}"} for i in range(10)])
    s = load_splits(section(f), tokenizer)
    assert (len(s.train), len(s.valid), len(s.test)) == (9, 1, 0)
    assert s.sources["valid"] == f"{f} (valid_fraction 0.1, seed 0)" and s.sources["test"] == "(none)"


def test_truncation_is_counted(tokenizer, wikisql_dir):
    s = load_splits(section(wikisql_dir, max_seq_length=64), tokenizer)
    longer = sum(len(tokenizer(json.loads(x)["text"]).input_ids) + 1 > 64 for x in (wikisql_dir / "train.jsonl").read_text().splitlines())
    assert s.n_truncated["train"] == longer > 0 and all(len(e.ids) <= 64 for e in s.train)
    assert sum(e.truncated for e in s.train) == longer and s.n_dropped["train"] == 0


def test_examples_without_targets_are_dropped_and_counted_and_an_empty_split_is_an_error(tmp_path, tokenizer):
    long_prompt = {"prompt": "word " * 50, "completion": "x"}
    f = jsonl(tmp_path / "train.jsonl", [long_prompt, {"prompt": "short", "completion": "x"}])
    s = load_splits(section(f, valid_fraction=0, max_seq_length=16), tokenizer)
    assert len(s.train) == 1 and s.n_dropped["train"] == 1 and s.n_truncated["train"] == 1
    g = jsonl(tmp_path / "g.jsonl", [long_prompt])
    with pytest.raises(DataError, match="none of the 1 train examples has a token to train on"):
        load_splits(section(g, valid_fraction=0, max_seq_length=16), tokenizer)


# ---------------------------------------------------------------- batches and summary


def test_make_batch_shifts_and_pads():
    b = make_batch([Example([1, 2, 3, 4], [0, 0, 1, 1]), Example([5, 6], [0, 1])], pad_id=9)
    np.testing.assert_array_equal(b.inputs, [[1, 2, 3], [5, 9, 9]])
    np.testing.assert_array_equal(b.targets, [[2, 3, 4], [6, 9, 9]])
    np.testing.assert_array_equal(b.mask, [[0, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(b.attention_mask, [[1, 1, 1], [1, 0, 0]])
    assert (b.inputs.dtype, b.targets.dtype, b.mask.dtype, b.attention_mask.dtype) == (np.int32, np.int32, np.float32, np.int32)
    assert b.n_targets == 3 and b.n_tokens == 4


def test_a_batch_whose_mask_is_all_zero_is_an_error():
    # mask[0] is never a target: nothing predicts the first token
    with pytest.raises(DataError, match="all zero"):
        make_batch([Example([1, 2, 3], [1, 0, 0]), Example([4], [1])], pad_id=0)


def test_summary_on_a_hand_made_set():
    train = [Example([7] * n, [0] * (n - 2) + [1, 1], truncated=n == 40) for n in (10, 20, 30, 40)]
    s = Splits(train, [Example([1, 2], [1, 1])], [], "text", "all", {"train": 1, "valid": 0, "test": 0}, {}, {"train": 2})
    out = summarize(s, 64)
    # nearest-rank percentiles of [10, 20, 30, 40]: p50 = 2nd, p90 = p99 = 4th
    assert out["train"] == {
        "count": 4, "p50": 20, "p90": 40, "p99": 40, "max": 40, "tokens": 100,
        "target_tokens": 8, "truncated": 1, "dropped": 2,
    }  # fmt: skip
    assert out["valid"]["target_tokens"] == 1 and out["test"]["count"] == 0 and out["test"]["max"] == 0
    assert summarize(s, 25)["train"]["truncated"] == 2  # the 30-token example would be cut at 25 too
