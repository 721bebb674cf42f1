"""Preference data (ftkit.data.preference): every row shape and file type to Pairs, masks on the responses only,
one prompt for both sequences, TRL's truncation counted, identical pairs left out, the token cache, the shipped pairs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from builders import REPO

from ftkit.common.errors import DataError
from ftkit.data import token_cache
from ftkit.data.batch import Pair
from ftkit.data.encode import _encode_chat, tokenize_splits
from ftkit.data.pairs import pair_micro_batches
from ftkit.data.preference import check_objective, sequences, tokenize
from ftkit.data.stats import notes, summarize
from ftkit.data.token_cache import PairStore, load_splits
from ftkit.recipe.schema import DataSection
from ftkit.train.prepare import data_fingerprint

USER = {"role": "user", "content": "count rows"}
YES = {"role": "assistant", "content": "SELECT COUNT(*) FROM t"}
NO = {"role": "assistant", "content": "SELECT name FROM t"}
ROWS = [{"prompt": "count rows in t\nSQL:", "chosen": " SELECT COUNT(*) FROM t", "rejected": " SELECT name FROM t"},
        {"prompt": "names in t\nSQL:", "chosen": " SELECT name FROM t", "rejected": " SELECT COUNT(*) FROM t"}]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_of(tmp_path: Path, tokenizer, rows: list[dict], name: str = "train.jsonl", **data):
    f = jsonl(tmp_path / name, rows)
    splits = tokenize(DataSection(path=str(f), valid_fraction=0, **data), tokenizer)
    assert splits.format == "preference" and splits.train_on == "completion"
    return splits


def parts(tokenizer, pair: Pair) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) as text; checks the prompt is the same ids in both."""
    c, r = pair.chosen, pair.rejected
    a = c.mask.index(1)
    assert r.mask.index(1) == a and c.ids[:a] == r.ids[:a] and not any(c.mask[:a]) and not any(r.mask[:a])
    return tokenizer.decode(c.ids[:a]), tokenizer.decode(c.ids[a:]), tokenizer.decode(r.ids[a:])


def test_plain_rows_prompt_then_each_response_and_eos(tmp_path, tokenizer):
    splits = pairs_of(tmp_path, tokenizer, ROWS)
    (p, q) = splits.train
    assert parts(tokenizer, p) == ("count rows in t\nSQL:", " SELECT COUNT(*) FROM t<|im_end|>", " SELECT name FROM t<|im_end|>")
    prompt = tokenizer("count rows in t\nSQL:")["input_ids"]
    response = tokenizer(" SELECT name FROM t", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert p.rejected.ids == prompt + response and p.rejected.mask == [0] * len(prompt) + [1] * len(response)
    assert p.ids == p.chosen.ids + p.rejected.ids and not p.truncated
    assert parts(tokenizer, q)[1] == " SELECT name FROM t<|im_end|>"
    assert splits.n_truncated == {"train": 0, "valid": 0, "test": 0} and splits.n_dropped["train"] == 0


def sft_last_turn(tokenizer, messages: list[dict], data: DataSection) -> tuple[list[int], list[int]]:
    """What SFT chat encoding gives the conversation, its mask kept on the last assistant turn only."""
    ids, mask = _encode_chat(messages, "completion", tokenizer, data)
    last = max(i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1]))
    return ids, [0] * last + mask[last:]


@pytest.mark.parametrize("shape", ["messages", "message", "string", "hub", "prompt_list"])
def test_chat_rows_encode_as_sft_chat_with_the_mask_on_the_response_turn(tmp_path, tokenizer, shape):
    earlier = [USER, YES, {"role": "user", "content": "and the names?"}]  # an earlier assistant turn: prompt, not target
    rows = {
        "messages": {"messages": earlier, "chosen": [NO], "rejected": [YES]},
        "message": {"messages": earlier, "chosen": NO, "rejected": YES},
        "string": {"messages": earlier, "chosen": NO["content"], "rejected": YES["content"]},
        "hub": {"chosen": earlier + [NO], "rejected": earlier + [YES]},
        "prompt_list": {"prompt": earlier, "chosen": [NO], "rejected": [YES]},
    }
    data = DataSection(path="x")
    (pair,) = pairs_of(tmp_path, tokenizer, [rows[shape]]).train
    for side, answer in ((pair.chosen, NO), (pair.rejected, YES)):
        assert (side.ids, side.mask) == sft_last_turn(tokenizer, earlier + [answer], data)
    prompt, chosen, rejected = parts(tokenizer, pair)
    assert prompt.endswith("and the names?<|im_end|>\n<|im_start|>assistant\n") and prompt.count("SELECT COUNT") == 1
    assert (chosen, rejected) == ("SELECT name FROM t<|im_end|>\n", "SELECT COUNT(*) FROM t<|im_end|>\n")
    assert tokenizer.decode([t for t, m in zip(pair.chosen.ids, pair.chosen.mask) if m]) == "SELECT name FROM t<|im_end|>"


def test_a_named_chat_format_writes_string_rows_as_a_conversation(tmp_path, tokenizer):
    splits = pairs_of(tmp_path, tokenizer, ROWS[:1], chat_format="chatml", system_prompt="You write SQL.")
    prompt, chosen, _ = parts(tokenizer, splits.train[0])
    assert prompt == ("<|im_start|>system\nYou write SQL.<|im_end|>\n<|im_start|>user\ncount rows in t\nSQL:<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert chosen == " SELECT COUNT(*) FROM t<|im_end|>\n"
    plain = pairs_of(tmp_path, tokenizer, ROWS[:1], system_prompt="You write SQL.")  # auto: plain text, no system turn
    assert parts(tokenizer, plain.train[0])[0] == "count rows in t\nSQL:"


def test_strings_without_a_prompt_share_their_leading_text_up_to_a_word(tmp_path, tokenizer):
    row = {"chosen": "Human: which table? Assistant: the cat table", "rejected": "Human: which table? Assistant: the car table"}
    prompt, chosen, rejected = parts(tokenizer, pairs_of(tmp_path, tokenizer, [row]).train[0])
    assert (prompt, chosen, rejected) == ("Human: which table? Assistant: the", " cat table<|im_end|>", " car table<|im_end|>")


def test_csv_parquet_and_a_hub_id_read_like_jsonl(tmp_path, tokenizer, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    want = pairs_of(tmp_path / "j", tokenizer, ROWS).train
    (tmp_path / "c").mkdir()
    with (tmp_path / "c" / "train.csv").open("w", newline="") as f:
        import csv

        w = csv.DictWriter(f, ["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "train.parquet")
    for path in (tmp_path / "c" / "train.csv", tmp_path / "train.parquet"):
        assert tokenize(DataSection(path=str(path), valid_fraction=0), tokenizer).train == want

    datasets = pytest.importorskip("datasets")
    hub = [{"chosen": [USER, NO], "rejected": [USER, YES]}] * 3
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict(
        train=datasets.Dataset.from_list(hub), test=datasets.Dataset.from_list(hub[:1])))
    splits = tokenize(DataSection(path="someone/prefs", valid_fraction=0, cache=False), tokenizer)
    assert (splits.format, len(splits.train), len(splits.test)) == ("preference", 3, 1)
    assert parts(tokenizer, splits.train[0])[1] == "SELECT name FROM t<|im_end|>\n"


def test_mapping_keys_and_field_names(tmp_path, tokenizer):
    want = pairs_of(tmp_path / "a", tokenizer, ROWS).train
    renamed = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    got = pairs_of(tmp_path / "b", tokenizer, renamed, prompt_field="q", chosen_field="good", rejected_field="bad").train
    assert got == want
    nested = [{"ask": {"text": r["prompt"][: -len("\nSQL:")]}, "better": r["chosen"], "worse": r["rejected"]} for r in ROWS]
    mapped = pairs_of(tmp_path / "c", tokenizer, nested, columns={"question": "ask.text", "chosen": "better", "rejected": "worse"},
                      prompt_template="{question}\nSQL:").train
    assert mapped == want
    chat = [{"conv": [USER], "chosen": [NO], "rejected": [YES]}]
    assert pairs_of(tmp_path / "d", tokenizer, chat, messages_field="conv").train == \
        pairs_of(tmp_path / "e", tokenizer, [{"messages": [USER], "chosen": [NO], "rejected": [YES]}]).train


def test_truncation_keeps_the_prompt_cuts_the_responses_and_counts(tmp_path, tokenizer):
    long = [{"prompt": "count rows in t\nSQL:", "chosen": " SELECT COUNT(*) FROM t WHERE a = 1 AND b = 2",
             "rejected": " SELECT name FROM t"}] + ROWS[1:]
    n_prompt = len(tokenizer("count rows in t\nSQL:")["input_ids"])
    splits = pairs_of(tmp_path, tokenizer, long, max_seq_length=n_prompt + 6)
    p = splits.train[0]
    assert p.truncated and p.chosen.truncated and len(p.chosen.ids) == n_prompt + 6 and p.chosen.ids[:n_prompt] == p.rejected.ids[:n_prompt]
    assert not p.rejected.truncated and len(p.rejected.ids) < n_prompt + 6
    assert splits.n_truncated["train"] == 1 and splits.n_prompt_cut["train"] == 0
    said = " ".join(notes(splits, DataSection(path="x", max_seq_length=n_prompt + 6)))
    assert "1 of 2 train pairs" in said and "prompts are kept and their responses cut" in said and "p99" in said

    tight = pairs_of(tmp_path, tokenizer, ROWS[:1], max_seq_length=8)  # the prompt alone fills 8 tokens
    (q,) = tight.train
    assert n_prompt >= 8 and tight.n_prompt_cut["train"] == 1 and tight.n_truncated["train"] == 1
    assert q.chosen.ids[:4] == tokenizer("count rows in t\nSQL:")["input_ids"][-4:] and len(q.chosen.ids) == 8
    assert "keep only their last 4 tokens" in " ".join(notes(tight, DataSection(path="x", max_seq_length=8)))


def test_identical_and_empty_pairs_are_left_out_and_counted_with_where_and_why(tmp_path, tokenizer):
    rows = [ROWS[0],
            {"prompt": "p\nSQL:", "chosen": " SELECT a", "rejected": " SELECT a"},
            {"prompt": "q\nSQL:", "chosen": " SELECT a FROM t", "rejected": " SELECT a FROM u"},  # same once cut
            {"prompt": "r\nSQL:", "chosen": "  ", "rejected": " SELECT b"}]
    cut = len(tokenizer("q\nSQL:")["input_ids"]) + len(tokenizer(" SELECT a FROM", add_special_tokens=False)["input_ids"])
    splits = pairs_of(tmp_path, tokenizer, rows, max_seq_length=cut)
    assert len(splits.train) == 1 and splits.n_dropped["train"] == 3
    f = tmp_path / "train.jsonl"
    assert splits.dropped_where["train"] == [
        f"{f}:2 (chosen and rejected are the same tokens)",
        f"{f}:3 (chosen and rejected are the same after truncation to data.max_seq_length = {cut})",
        f"{f}:4 (the chosen response is empty)"]
    said = " ".join(notes(splits, DataSection(path="x", max_seq_length=cut)))
    assert "3 of 4 train pairs are left out" in said and f"{f}:3" in said


def test_detection_and_errors_name_the_row_and_key(tmp_path, tokenizer):
    from ftkit.data.rows import detect_format

    d = DataSection(path="x")
    assert detect_format([{"messages": [USER], "chosen": [NO], "rejected": [YES]}], d, "f") == "preference"
    assert detect_format([{"ask": "a", "good": "b", "bad": "c"}], d.model_copy(update={"chosen_field": "good", "rejected_field": "bad"}), "f") == "preference"
    with pytest.raises(DataError, match="preference data 'chosen' and 'rejected'"):
        detect_format([{"prompt": "a", "chosen": "b"}], d, "f")
    f = tmp_path / "train.jsonl"
    cases = [({"prompt": "a", "chosen": "b"}, "missing key 'rejected'"),
             ({"prompt": "a", "chosen": 3, "rejected": "c"}, "'chosen' must be a string, a {role, content} message or a list"),
             ({"prompt": 3, "chosen": "b", "rejected": "c"}, "'prompt' must be a string or a list of messages"),
             ({"chosen": [NO], "rejected": [YES]}, "no prompt"),
             ({"messages": [USER], "chosen": [USER, NO], "rejected": [YES]}, "must start with an assistant turn"),
             ({"messages": [USER], "chosen": [{"role": "bot", "content": "x"}], "rejected": [YES]}, "role 'bot' is not a chat role")]
    for row, message in cases:
        with pytest.raises(DataError) as e:
            pairs_of(tmp_path, tokenizer, [ROWS[0], row])
        assert f"{f}:2 (train row 2)" in str(e.value) and message in str(e.value), str(e.value)
    with pytest.raises(DataError, match="data.train_on = 'all'"):
        pairs_of(tmp_path, tokenizer, ROWS, train_on="all")
    with pytest.raises(DataError, match="tokenized as pairs by ftkit.data.preference.tokenize"):
        tokenize_splits(DataSection(path=str(f), valid_fraction=0), tokenizer)
    sft = DataSection(path=str(jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": " b"}] * 2)), valid_fraction=0)
    assert tokenize(sft, tokenizer) == tokenize_splits(sft, tokenizer)  # other formats: SFT examples, as before


def test_objective_and_format_must_agree():
    check_objective("preference", "dpo", "f")
    check_objective("chat", "sft", "f")
    with pytest.raises(DataError, match="train.objective = 'orpo' trains on preference pairs, but this is text data"):
        check_objective("text", "orpo", "f")
    with pytest.raises(DataError, match="Set train.objective, or data.format"):
        check_objective("preference", "sft", "f")


def test_the_token_cache_stores_pairs_and_gives_back_what_tokenizing_gives(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("FTKIT_CACHE", str(tmp_path / "cache"))
    rows = ROWS + [{"prompt": "p\nSQL:", "chosen": " SELECT a", "rejected": " SELECT a"},
                   {"messages": [USER], "chosen": NO, "rejected": YES}]
    rows[0] = dict(rows[0], chosen=rows[0]["chosen"] + " WHERE a = 1 AND b = 2 AND c = 3")
    d = tmp_path / "d"
    jsonl(d / "train.jsonl", rows)
    jsonl(d / "valid.jsonl", ROWS[1:])
    data = DataSection(path=str(d), max_seq_length=16)
    calls = []

    def counting(data, tok):
        calls.append(1)
        return tokenize(data, tok)

    fresh = tokenize(data, tokenizer)
    first, again = token_cache.load(data, tokenizer, counting), token_cache.load(data, tokenizer, counting)
    assert calls == [1] and isinstance(again.train, PairStore) and len(again.train) == 3 == len(fresh.train)
    for split in ("train", "valid", "test"):
        assert list(getattr(again, split)) == list(getattr(fresh, split)) == list(getattr(first, split))
    assert again.train[-1] == fresh.train[-1] and again.train[0:2] == fresh.train[0:2] and again.train[0].truncated
    for key in ("format", "train_on", "n_truncated", "n_dropped", "n_prompt_cut", "lengths", "dropped_where", "sources"):
        assert getattr(again, key) == getattr(fresh, key), key
    assert list(again.train.lengths()) == [len(p.ids) for p in fresh.train]
    assert data_fingerprint(again.train) == data_fingerprint(fresh.train) == data_fingerprint(sequences(fresh.train))
    off = load_splits(data.model_copy(update={"cache": False}), tokenizer, quiet=True)
    assert off.train == fresh.train and calls == [1]
    assert summarize(again, 16) == summarize(fresh, 16)
    s = summarize(fresh, 16)["train"]
    assert s["count"] == 3 and s["max"] == 16 and s["truncated"] == fresh.n_truncated["train"] == 3 and s["dropped"] == 1
    assert s["tokens"] == sum(len(e.ids) for e in sequences(fresh.train))
    batches = pair_micro_batches(list(again.train), 2, tokenizer.pad_token_id, packing=True)  # the loop's next step
    assert sum(b.n_pairs for b in batches) == 3


def test_the_shipped_commonsenseqa_pairs_are_what_the_script_builds(tmp_path, tokenizer):
    spec = importlib.util.spec_from_file_location("build_pairs", REPO / "data" / "commonsenseqa_pairs" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.build(tmp_path) == {"train": 488, "valid": 100}
    for split in ("train", "valid"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (REPO / "data" / "commonsenseqa_pairs" / f"{split}.jsonl").read_bytes()
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("Question: The sanctions against the school") and first["prompt"].endswith("E. avoid\nAnswer:")
    assert (first["chosen"], first["rejected"]) == (" ignore", " enforce")
    splits = tokenize(DataSection(path=str(REPO / "data" / "commonsenseqa_pairs"), max_seq_length=512), tokenizer)
    assert (len(splits.train), len(splits.valid), splits.n_dropped["train"], splits.n_dropped["valid"]) == (488, 100, 0, 0)


def test_the_shipped_wikisql_pairs_are_what_the_script_builds(tmp_path, tokenizer):
    spec = importlib.util.spec_from_file_location("build_sql_pairs", REPO / "data" / "wikisql_pairs" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.build(tmp_path) == {"train": {"column": 497, "value": 503}, "valid": {"column": 57, "value": 43}}
    for split in ("train", "valid"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (REPO / "data" / "wikisql_pairs" / f"{split}.jsonl").read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "valid.jsonl").read_text().splitlines()]
    sources = [json.loads(x)["text"] for x in (REPO / "data" / "wikisql" / "valid.jsonl").read_text().splitlines()]
    for row, text in zip(rows, sources, strict=True):  # the chosen SQL is the source's; the rejected differs in one place
        assert row["prompt"] + row["chosen"] == text and row["rejected"] != row["chosen"]
        kept = row["chosen"].split(" FROM ")[0] if row["corruption"] == "value" else row["chosen"].split(" FROM ", 1)[1]
        assert kept in row["rejected"]
    splits = tokenize(DataSection(path=str(REPO / "data" / "wikisql_pairs"), max_seq_length=1024), tokenizer)  # this tokenizer: up to 536
    assert (len(splits.train), len(splits.valid), splits.n_dropped["train"], splits.n_dropped["valid"]) == (1000, 100, 0, 0)
    assert splits.n_truncated["train"] == splits.n_truncated["valid"] == 0
