"""Declarative column mapping: templates, label names (lists, files, the hub's ClassLabel), choices in
the shapes data sets use, fallbacks for columns, unlabelled rows, row samples, [[data.mix]], and the
recipe errors for all of it."""

from __future__ import annotations

import json

import pytest

from ftkit.common.errors import DataError, RecipeError
from ftkit.data import mapping
from ftkit.data.mapping import read_rows
from ftkit.data.token_cache import load_splits
from ftkit.recipe.load import build_recipe, load_recipes
from ftkit.recipe.tasks import task_settings, tasks_of


def section(path, **kw):
    return build_recipe({"model": {"path": "m"}, "data": {"path": str(path), "cache": False, **kw}}, "t", check_paths=False).data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_templates_label_ids_and_names(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"text": "hi", "label": 1}, {"text": "yo", "label": "0"}, {"text": "x", "label": -1}])
    d = section(f, label_field="label", label_names=["neg", "pos"], prompt_template="Say: {text}\nIs:",
                completion_template=" {label} ({label_id} of {label_names})", valid_fraction=0.0)
    rows = read_rows(d)["train"]
    assert [r["prompt"] for r in rows] == ["Say: hi\nIs:", "Say: yo\nIs:"]  # -1: no label, left out
    assert [r["completion"] for r in rows] == [" pos (1 of neg, pos)", " neg (0 of neg, pos)"]
    assert [r["_gold"] for r in rows] == ["pos", "neg"] and rows[0]["_raw"] == {"text": "hi", "label": 1}


def test_label_names_from_a_file_and_errors(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"q": "a", "y": 2}])
    (tmp_path / "names.json").write_text('["a", "b", "c"]')
    (tmp_path / "names.txt").write_text("a\nb\n")
    assert read_rows(section(f, label_field="y", label_names=str(tmp_path / "names.json"), prompt_template="{q}",
                             valid_fraction=0.0))["train"][0]["completion"] == "c"
    with pytest.raises(DataError, match="not one of the 2 label_names, nor an id 0..1"):
        read_rows(section(f, label_field="y", label_names=str(tmp_path / "names.txt"), prompt_template="{q}", valid_fraction=0.0))
    with pytest.raises(DataError, match="set data.label_names"):
        read_rows(section(f, label_field="y", prompt_template="{q}", valid_fraction=0.0))


def test_hub_class_label_names_are_read_from_the_data_sets_features(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    from datasets import ClassLabel, Dataset, Features, Value

    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    Dataset.from_dict({"text": ["a"], "label": [1]}, features=Features({"text": Value("string"), "label": ClassLabel(
        names=["neg", "pos"])})).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    (hub / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n  - name: label\n    dtype:\n      class_label:\n"
        "        names:\n          '0': neg\n          '1': pos\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*\n---\n")
    # the real lookup, on a folder laid out as a hub repository
    assert mapping.hub_label_names(str(hub), None, "label") == ["neg", "pos"]
    # and a recipe on a hub id asks it for the label column's names
    asked = []
    monkeypatch.setattr(mapping, "hub_label_names", lambda p, s, c: asked.append((p, s, c)) or ["neg", "pos"])
    m = mapping.Mapper(section("org/sent", label_field="label", columns={"label": ["label", "category"]}), None)
    assert m.label({"label": 1}, "row") == "pos" and asked == [("org/sent", None, "label")]


def test_columns_with_fallbacks_and_dotted_paths(tmp_path):
    (tmp_path / "train.tsv").write_text("label\tsentence\n1\tgood film\n")
    (tmp_path / "dev.tsv").write_text("label\tcontent\n0\tbad film\n")
    d = section(tmp_path, label_field="label", label_names=["negative", "positive"], columns={"sentence": ["sentence", "content"]},
                prompt_template="Review: {sentence}\nSentiment:", completion_template=" {label}")
    rows = read_rows(d)
    assert rows["train"][0]["prompt"] == "Review: good film\nSentiment:" and rows["valid"][0]["completion"] == " negative"
    nested = write_jsonl(tmp_path / "n.jsonl", [{"question": {"stem": "Why?", "tags": ["a", "b"]}, "label": "yes"}])
    r = read_rows(section(nested, label_field="label", prompt_template="{question.stem} {question.tags.1}", valid_fraction=0.0))
    assert r["train"][0]["prompt"] == "Why? b"
    with pytest.raises(DataError, match=r"\{nope\}"):
        read_rows(section(nested, label_field="label", prompt_template="{nope}", valid_fraction=0.0))


@pytest.mark.parametrize("choices,answer", [
    ({"label": ["A", "B", "C"], "text": ["bank", "library", "mall"]}, "B"),  # tau/commonsense_qa on the hub
    ([{"label": "A", "text": "bank"}, {"label": "B", "text": "library"}, {"label": "C", "text": "mall"}], "B"),  # the original files
    (["bank", "library", "mall"], 1),  # a list of strings and an index
    (["bank", "library", "mall"], "library"),  # the answer's text
])
def test_choices_in_every_shape(tmp_path, choices, answer):
    f = write_jsonl(tmp_path / "train.jsonl", [{"q": "Where are books?", "c": choices, "a": answer}])
    d = section(f, choices_field="c", answer_field="a", prompt_template="{q}\n{choices}\nAnswer:", completion_template=" {answer_text}",
                valid_fraction=0.0)
    (row,) = read_rows(d)["train"]
    assert row["prompt"] == "Where are books?\nA. bank\nB. library\nC. mall\nAnswer:" and row["completion"] == " library"
    assert row["_gold"] == 1
    m = mapping.Mapper(d, None)
    assert m.candidates(row, "r") == ([" bank", " library", " mall"], ["A", "B", "C"])


def test_rows_without_an_answer_are_left_out(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"q": "x", "c": ["a", "b"], "a": ""}, {"q": "y", "c": ["a", "b"], "a": 0}])
    rows = read_rows(section(f, choices_field="c", answer_field="a", prompt_template="{q}", valid_fraction=0.0))["train"]
    assert [r["prompt"] for r in rows] == ["y"] and rows[0]["completion"] == "A"  # default completion: the answer's label


def test_max_rows_keeps_a_seeded_sample_in_file_order(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"t": str(i), "label": "a"} for i in range(100)])
    d = section(f, label_field="label", prompt_template="{t}", max_rows={"train": 10}, valid_fraction=0.1)
    a, b = read_rows(d), read_rows(d)
    assert len(a["train"]) == 10 and len(a["valid"]) == 10 and a == b
    idx = [int(r["prompt"]) for r in a["train"]]
    assert idx == sorted(idx) and idx != list(range(10))
    other = read_rows(d.model_copy(update={"split_seed": 1}))
    assert [r["prompt"] for r in other["train"]] != [r["prompt"] for r in a["train"]]


def test_a_mix_trains_every_source_with_its_own_mapping(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"query {i}", "intent": "card" if i % 2 else "cash"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": f"q{i}", "ch": ["x", "y"], "ans": "B"} for i in range(10)])
    (tmp_path / "c").mkdir()
    write_jsonl(tmp_path / "c" / "train.jsonl", [{"text": f"table t\nQ: how {i}\nA: SELECT {i}"} for i in range(6)])
    write_jsonl(tmp_path / "c" / "valid.jsonl", [{"text": "table t\nQ: how\nA: SELECT 1"}])
    d = section(a, name="intents", label_field="intent", prompt_template="Intent of: {text}\n", valid_fraction=0.2, mix=[
        {"name": "mc", "path": str(b), "choices_field": "ch", "answer_field": "ans", "prompt_template": "{q}\n{choices}\n",
         "completion_template": "{answer}"},
        {"name": "sql", "path": str(tmp_path / "c"), "response_template": "\nA:"},
    ])
    rows = read_rows(d)
    assert {r["_task"] for r in rows["train"]} == {"intents", "mc", "sql"}
    assert [len([r for r in rows["valid"] if r["_task"] == t]) for t in ("intents", "mc", "sql")] == [2, 2, 1]  # 80/20 where no valid split
    sql = next(r for r in rows["train"] if r["_task"] == "sql")
    assert sql["prompt"].endswith("\nA:") and sql["completion"].startswith(" SELECT")
    splits = load_splits(d, tokenizer)
    assert splits.format == "completion" and len(splits.train) == 8 + 8 + 6


def test_a_mix_of_formats_that_cannot_train_together_is_an_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}] * 4)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "plain text"}] * 4)
    d = section(a, valid_fraction=0.0, mix=[{"name": "t", "path": str(b), "valid_fraction": 0.0}])
    with pytest.raises(DataError, match="different formats"):
        read_rows(d)


def test_recipe_errors_for_mapping_and_eval(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    p = tmp_path / "r.toml"
    head = f'[model]\npath = "{tmp_path}"\n[data]\npath = "{data}"\n'
    p.write_text(head + '[[data.mix]]\nname = "x"\npath = "p"\npromt_template = "{q}"\n[eval.tasks.x]\nscorin = "loglik"\n')
    with pytest.raises(RecipeError) as e:
        load_recipes([p])
    msg = str(e.value)  # unknown keys inside [[data.mix]] and [eval.tasks.NAME] are named, with a suggestion
    assert "data.mix.0.promt_template" in msg and "Did you mean 'prompt_template'" in msg
    assert "eval.tasks.x.scorin" in msg and "Did you mean 'scoring'" in msg
    p.write_text(head + 'loom = "nope.toml"\nanswer_field = "a"\n[[data.mix]]\nname = "x"\npath = "missing/here/folder"\n'
                 '[eval]\ntask = "classification"\n[eval.tasks.y]\nscoring = "generate"\n')
    with pytest.raises(RecipeError) as e:
        load_recipes([p])
    msg = str(e.value)
    assert "data.loom: " in msg and "nope.toml does not exist" in msg
    assert "data.answer_field needs data.choices_field" in msg
    assert "data.mix[0] (x).path" in msg
    assert "eval.tasks.y: no such task; the tasks are r, x" in msg
    assert "task r: eval task 'classification' needs data.label_field" in msg


def test_nested_keys_round_trip_through_the_resolved_recipe(tmp_path):
    from builders import REPO

    (r,) = load_recipes([REPO / "recipes" / "multitask.toml"], check_paths=False)
    again = tmp_path / "again.toml"
    again.write_text(r.to_toml())
    (back,) = load_recipes([again], check_paths=False)
    assert back.data.mix == r.data.mix and back.eval.tasks == r.eval.tasks and back.data.columns == r.data.columns
    assert [t.kind for t in tasks_of(back)] == ["classification", "multiple_choice", "generation"]
    assert task_settings(back, "wikisql").normalize == "sql" and task_settings(back, "commonsense_qa").max_examples == 200
