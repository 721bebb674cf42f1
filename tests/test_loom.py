"""Word loom prompts (OgbujiPT's TOML convention, as mlx-tuning-fork uses it): sections, markers, files,
languages, and the same prompt for generation and for training data."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ftkit.common.errors import FtkitError
from ftkit.data import loom

LOOM = '''
lang = "en"

[system_prompt]
_ = "You are a claims adjuster."

[context]
_ = "Coverage codes: {codes}."

[question]
_ = """Which coverage code fits this claim?
{claim}"""
_m = ["claim"]
_fr = "Quel code convient à ce sinistre ?\\n{claim}"

[codes]
_ = "AD, GB, GD"

[terse]
text = "Answer with the code only."

[braces]
_ = "JSON like {{\\"code\\": \\"{claim}\\"}} please"

[loop_a]
_ = "{loop_b}"

[loop_b]
_ = "{loop_a}"
'''


@pytest.fixture
def loom_file(tmp_path):
    p = tmp_path / "prompts.toml"
    p.write_text(LOOM)
    (tmp_path / "policy.txt").write_text("Policy: {claim} is covered.\n")
    return p


def test_default_sections_and_markers_from_values_and_from_the_loom(loom_file):
    lm = loom.load(loom_file)
    p = loom.build(lm, None, {"claim": "IV hit a deer"})
    assert p.system == "You are a claims adjuster."
    assert p.context == "Coverage codes: AD, GB, GD."  # {codes} is another table of the loom
    assert p.question == "Which coverage code fits this claim?\nIV hit a deer"
    # context joins the system turn, as mlx-tuning-fork lays it out
    assert p.messages() == [
        {"role": "system", "content": "You are a claims adjuster.\n\nCoverage codes: AD, GB, GD."},
        {"role": "user", "content": "Which coverage code fits this claim?\nIV hit a deer"},
    ]
    assert p.text() == "You are a claims adjuster.\n\nCoverage codes: AD, GB, GD.\n\nWhich coverage code fits this claim?\nIV hit a deer"
    assert lm.declared["question"] == ["claim"]


def test_one_two_or_three_section_names(loom_file):
    lm = loom.load(loom_file)
    values = {"claim": "x"}
    one = loom.build(lm, "braces", values)
    assert one.question == 'JSON like {"code": "x"} please' and one.system == "You are a claims adjuster."
    two = loom.build(lm, "terse question", values)
    assert (two.system, two.context) == ("Answer with the code only.", "Coverage codes: AD, GB, GD.")
    three = loom.build(lm, ["terse", "codes", "question"], values)
    assert three.context == "AD, GB, GD"
    with pytest.raises(FtkitError, match="give 1"):
        loom.build(lm, "a b c d", values)
    with pytest.raises(FtkitError, match=r"no section \[questoin\].*Did you mean \[question\]"):
        loom.build(lm, "questoin", values)


def test_a_section_in_brackets_is_a_file(loom_file):
    p = loom.build(loom.load(loom_file), "system_prompt [policy.txt] question", {"claim": "theft"})
    assert p.context == "Policy: theft is covered.\n"
    with pytest.raises(FtkitError, match="names a file"):
        loom.build(loom.load(loom_file), "system_prompt [missing.txt] question", {"claim": "theft"})


def test_missing_markers_are_an_error_that_names_them(loom_file):
    with pytest.raises(loom.MissingMarkers) as e:
        loom.build(loom.load(loom_file), None, {})
    assert e.value.names == ["claim"] and "{claim}" in str(e.value) and "[question]" in str(e.value)
    with pytest.raises(loom.MissingMarkers, match=r"\{a\}, \{b\}"):
        loom.fill("{a} and {b} and {a}", {}, "here")
    with pytest.raises(FtkitError, match="refer back"):
        loom.build(loom.load(loom_file), "loop_a", {})


def test_languages(loom_file):
    fr = loom.load(loom_file, lang="fr")
    assert fr.items["question"].startswith("Quel code")
    assert "system_prompt" not in fr.items  # no French text for it
    with pytest.raises(FtkitError, match="no prompt text in language 'de'"):
        loom.load(loom_file, lang="de")


def test_marker_arguments(tmp_path):
    (tmp_path / "m.toml").write_text('claim = "from file"\ncodes = "AD"\n')
    (tmp_path / "claim.txt").write_text("a long claim\n")
    values = loom.parse_marker_args(["codes=[GB, GD]"], [tmp_path / "m.toml"])
    assert values == {"claim": "from file", "codes": "GB, GD"}  # mlx-tuning-fork's name=[value]; --marker wins
    assert loom.parse_marker_args([f"claim=@{tmp_path / 'claim.txt'}"])["claim"] == "a long claim\n"
    with pytest.raises(FtkitError, match="NAME=VALUE"):
        loom.parse_marker_args(["novalue"])
    with pytest.raises(FtkitError, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("x = ")
        loom.parse_marker_args([], [tmp_path / "bad.toml"])


def test_bad_files(tmp_path):
    with pytest.raises(FtkitError, match="no such loom file"):
        loom.load(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[a\n")
    with pytest.raises(FtkitError, match="not valid TOML"):
        loom.load(tmp_path / "bad.toml")


def test_generate_with_a_loom_builds_the_prompt_it_says(loom_file, tiny_model_dir):
    from transformers import AutoTokenizer

    from ftkit.cli import app
    from ftkit.data.encode import chat_prompt_ids

    runner = CliRunner()
    args = ["generate", "--model", str(tiny_model_dir), "--loom", str(loom_file), "--marker", "claim=IV hit a deer",
            "--max-tokens", "2", "--backend", "torch", "--json"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    built = loom.build(loom.load(loom_file), None, {"claim": "IV hit a deer"})
    chat = json.loads(runner.invoke(app, [*args, "--format", "chatml"]).stdout)
    assert chat["prompt_tokens"] == len(chat_prompt_ids(built.messages(), "chatml", tok))
    plain = json.loads(runner.invoke(app, args).stdout)
    assert plain["prompt_tokens"] == len(tok(built.text())["input_ids"])
    missing = runner.invoke(app, [*args[:5], "--max-tokens", "2", "--backend", "torch", "--json"])
    assert missing.exit_code == 2 and "{claim}" in json.loads(missing.stdout)["error"]


def test_training_rows_take_their_prompt_from_the_loom(loom_file, tmp_path, tokenizer):
    from ftkit.data.token_cache import load_splits
    from ftkit.recipe.load import build_recipe

    rows = [{"note": f"claim {i}", "code": "AD" if i % 2 else "GB"} for i in range(10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_recipe({"model": {"path": "m"}, "data": {
        "path": str(tmp_path / "train.jsonl"), "loom": str(loom_file), "columns": {"claim": "note"}, "label_field": "code",
        "completion_template": " {label}", "valid_fraction": 0.0, "cache": False}}, "t", check_paths=False).data
    splits = load_splits(data, tokenizer)
    first = splits.train[0]
    text = tokenizer.decode(first.ids)
    built = loom.build(loom.load(loom_file), None, {"claim": "claim 0"}).text()
    assert text.startswith(built) and text.endswith(" GB" + tokenizer.eos_token)
    # chat: the loom's system and context make the system turn
    chat = data.model_copy(update={"format": "chat", "chat_format": "chatml"})
    ex = load_splits(chat, tokenizer).train[0]
    assert tokenizer.decode(ex.ids).startswith("<|im_start|>system\nYou are a claims adjuster.\n\nCoverage codes: AD, GB, GD.<|im_end|>")
