from pathlib import Path

import pytest

from ftkit.common.errors import RecipeError
from ftkit.recipe.load import defaults_table, load_recipes

GOOD = """
[model]
path = "{model}"
[data]
path = "{data}"
[train]
iters = 5
"""


def write(tmp_path: Path, body: str, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


@pytest.fixture
def good(tmp_path, wikisql_dir):
    (tmp_path / "model").mkdir()
    return write(tmp_path, GOOD.format(model=tmp_path / "model", data=wikisql_dir))


def test_defaults_fill_in(good):
    (r,) = load_recipes([good])
    assert r.method.kind == "lora" and r.method.rank == 8 and r.train.iters == 5
    assert r.name == "r"


def test_all_problems_reported_together_with_file_line_and_suggestion(tmp_path, wikisql_dir):
    body = f"""
[model]
path = "{tmp_path}/nope"
[method]
kind = "loraa"
rnak = 4
[data]
path = "{wikisql_dir}"
[train]
batch_size = "four"
[trian]
x = 1
"""
    p = write(tmp_path, body)
    with pytest.raises(RecipeError) as e:
        load_recipes([p])
    msg = str(e.value)
    problems = e.value.problems
    assert any("method.rnak" in m and "Did you mean 'rank'" in m for m in problems), msg
    assert any("[trian]" in m and "Did you mean 'train'" in m for m in problems), msg
    assert any(f"{p}:5" in m and "method.kind" in m for m in problems), msg  # file:line of the bad value
    assert any(f"{p}:10" in m and "train.batch_size" in m for m in problems), msg
    # the missing model folder is only checked once the types are right; 4 problems at once here
    assert len(problems) >= 4


def test_missing_paths_and_impossible_combinations(tmp_path):
    body = """
[model]
path = "./no-such-model"
quantize = "nf4"
[method]
kind = "full"
[data]
path = "./no-data"
format = "text"
train_on = "completion"
"""
    with pytest.raises(RecipeError) as e:
        load_recipes([write(tmp_path, body)])
    text = "\n".join(e.value.problems)
    assert "model.path" in text and "does not exist" in text
    assert "data.path" in text
    assert "cannot train a quantized base" in text
    assert "response_template" in text


def test_hub_ids_are_not_checked_as_paths(tmp_path):
    body = '[model]\npath = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"\n[data]\npath = "PolyAI/banking77"\n'
    (r,) = load_recipes([write(tmp_path, body)])
    assert r.model.path == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"


def test_paths_are_relative_to_the_recipe_file(tmp_path, wikisql_dir):
    (tmp_path / "sub" / "m").mkdir(parents=True)
    body = f'[model]\npath = "m"\n[data]\npath = "{wikisql_dir}"\n[output]\ndir = "out"\n'
    (r,) = load_recipes([write(tmp_path / "sub", body)])
    assert r.model.path == str((tmp_path / "sub" / "m").resolve())
    assert r.output.dir == str((tmp_path / "sub" / "out").resolve())


def test_set_overrides_are_validated(good, tmp_path):
    (r,) = load_recipes([good], ["train.iters=20", "method.targets=['q_proj','v_proj']", "train.lr=1e-3"])
    assert r.train.iters == 20 and r.method.targets == ["q_proj", "v_proj"] and r.train.lr == 1e-3
    with pytest.raises(RecipeError) as e:
        load_recipes([good], ["train.iters=zero"])
    assert "train.iters" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipes([good], ["train.itres=3"])
    assert "Did you mean 'iters'" in str(e.value)
    with pytest.raises(RecipeError):
        load_recipes([good], ["iters=3"])


def test_bad_toml_names_the_file(tmp_path):
    p = write(tmp_path, "[model\npath=")
    with pytest.raises(RecipeError) as e:
        load_recipes([p])
    assert str(p) in str(e.value) and "TOML" in str(e.value)


def test_resolved_recipe_round_trips(good, tmp_path):
    (r,) = load_recipes([good])
    again = write(tmp_path, r.to_toml(), "again.toml")
    (r2,) = load_recipes([again])
    assert r2.model_dump(exclude={"name"}) == r.model_dump(exclude={"name"})


def test_every_key_has_a_documented_default():
    rows = defaults_table()
    keys = {k for k, _, _ in rows}
    assert {"model.path", "method.rank", "train.evals_per_epoch", "torch.precision"} <= keys
    assert all(help_ for _, _, help_ in rows)


def test_set_can_unset_a_key_and_its_errors_name_the_flag(good):
    (r,) = load_recipes([good], ["train.iters=null", "train.epochs=3"])
    assert r.train.iters is None and r.train.epochs == 3
    (r,) = load_recipes([good], ["torch.distributed=none", "model.quantize=none"])  # a choice, not an unset
    assert r.torch.distributed == "none" and r.model.quantize == "none"
    with pytest.raises(RecipeError) as e:
        load_recipes([good], ["train.iters=x"])
    assert e.value.problems[0].startswith("--set train.iters")
