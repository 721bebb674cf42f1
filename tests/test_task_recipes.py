"""The task recipes in recipes/ run on the real data copies in data/ (hub ids stay their defaults),
on the tiny model: each maps its data set's columns declaratively, and the multi-task one trains and
reports per-task metrics."""

from __future__ import annotations

import json
import re

import pytest
from builders import REPO
from typer.testing import CliRunner

from ftkit.cli import app

runner = CliRunner()

# recipe -> the local copy the tests point it at, and what its data must become
LOCAL = {
    "banking77": ("data/banking77", {"train": 1800, "valid": 201, "test": 616}),
    "sst2-tinyllama": ("data/sst2", {"train": 2245, "valid": 872, "test": 607}),
    "commonsense_qa": ("data/commonsenseqa", {"train": 488, "valid": 306, "test": 0}),
    "insurance-claims-local": (None, None),
    "wikisql-lora": (None, {"train": 1000, "valid": 100, "test": 100}),
    "wikisql-qlora": (None, {"train": 1000, "valid": 100, "test": 100}),
}
HUB = {"banking77": "PolyAI/banking77", "sst2-tinyllama": "stanfordnlp/sst2", "commonsense_qa": "tau/commonsense_qa",
       "insurance-claims": "infinite-dataset-hub/TextClaimsDataset", "multitask": "PolyAI/banking77"}


def run(*args):
    out = runner.invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hub_ids_are_the_defaults():
    from ftkit.recipe.load import load_recipes

    for name, hub in HUB.items():
        (r,) = load_recipes([REPO / "recipes" / f"{name}.toml"], check_paths=False)
        assert r.data.path == hub, name
    (r,) = load_recipes([REPO / "recipes" / "sst2-tinyllama.toml"], check_paths=False)
    assert r.model.path == "TinyLlama/TinyLlama-1.1B-Chat-v1.0" and r.method.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_each_task_recipe_reads_its_local_copy(name, tiny_model_dir, tmp_path):
    path, counts = LOCAL[name]
    sets = ["--set", f"model.path={tiny_model_dir}", "--set", "model.quantize=none", "--set", "data.max_seq_length=1024",
            "--set", f"output.dir={tmp_path / 'run'}", "--set", "data.cache=false"]
    if path:
        sets += ["--set", f"data.path={REPO / path}"]
    plan = run("train", str(REPO / "recipes" / f"{name}.toml"), "--dry-run", *sets)["stages"][0]
    assert plan["format"] in ("completion", "text") and plan["train_on"] == "completion"
    if counts:
        assert plan["examples"] == counts
    else:  # insurance: one file, 20% validation and 20% test held out
        assert plan["examples"]["valid"] == plan["examples"]["test"] == 103


def test_banking77_reads_label_names_from_either_column(tiny_model_dir):
    from ftkit.data.mapping import read_rows
    from ftkit.recipe.load import load_recipes

    (r,) = load_recipes([REPO / "recipes" / "banking77.toml"], [f"data.path={REPO / 'data/banking77'}"], check_paths=False)
    rows = read_rows(r.data)
    first = rows["train"][0]
    assert first["completion"] == " " + first["_raw"]["category"] and first["prompt"].endswith(first["_raw"]["text"] + "\nIntent:")
    assert len({row["_gold"] for row in rows["test"]}) == 77


@pytest.mark.slow
def test_the_multitask_recipe_trains_and_reports_each_task(tiny_model_dir, tmp_path):
    text = (REPO / "recipes" / "multitask.toml").read_text()
    # the local copies instead of the hub ids (the wikisql source is local already)
    text = text.replace('"PolyAI/banking77"', f'"{REPO / "data/banking77"}"').replace('"tau/commonsense_qa"', f'"{REPO / "data/commonsenseqa"}"')
    text = re.sub(r'path = "\.\./data/wikisql"', f'path = "{REPO / "data/wikisql"}"', text)
    recipe = tmp_path / "multitask.toml"
    recipe.write_text(text)
    sets = ["--set", f"model.path={tiny_model_dir}", "--set", f"output.dir={tmp_path / 'run'}", "--set", "data.max_seq_length=1024",
            "--set", "data.max_rows={train = 16, valid = 4}", "--set", "train.batch_size=4", "--set", "torch.precision=fp32",
            "--set", "data.cache=false"]
    plan = run("train", str(recipe), "--dry-run", *sets)["stages"][0]
    # 2 epochs over three sources of 16 rows; 80/20 where there is no validation split (banking77), sampled to 4
    assert plan["examples"]["train"] == 48 and plan["total_steps"] == 24
    trained = run("train", str(recipe), "--backend", "torch", *sets, "--set", "train.epochs=null", "--set", "train.iters=3")
    ev = run("eval", str(recipe), "--adapter", trained["adapter"], "--backend", "torch", *sets, "--set", "eval.max_examples=2",
             "--set", "eval.tasks.banking77.max_tokens=3", "--set", "eval.tasks.wikisql.max_tokens=4")
    assert ev["split"] == "valid" and set(ev["tasks"]) == {"banking77", "commonsense_qa", "wikisql"}
    after = ev["after"]["tasks"]
    assert after["banking77"]["task"] == "classification" and after["banking77"]["scoring"] == "generate"
    assert after["commonsense_qa"] == {"task": "multiple_choice", "choices": 5, "examples": 2, "accuracy": after["commonsense_qa"]["accuracy"]}
    assert after["wikisql"]["task"] == "generation" and after["wikisql"]["normalize"] == "sql" and after["wikisql"]["examples"] == 2
    assert set(ev["before"]["tasks"]) == set(after)
    assert json.loads(open(ev["saved"]).read())["after"]["tasks"] == after
