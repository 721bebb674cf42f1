"""Task metrics: the arithmetic on hand-made predictions, answer matching, normalisation, and label
scoring on a tiny model checked against log-probabilities computed by hand."""

from __future__ import annotations

import json
import math

import pytest

from ftkit.evaluate import tasks
from ftkit.evaluate.tasks import UNMATCHED


def test_accuracy_macro_f1_and_confusions_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    assert tasks.accuracy(gold, pred) == pytest.approx(4 / 6)
    # F1 per class: a: tp 2, fn 1 -> 4/5; b: tp 1, fp 1, fn 1 -> 1/2; c: tp 1, fp 1 -> 2/3
    assert tasks.macro_f1(gold, pred) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert tasks.top_confusions(gold, pred, 5) == [{"gold": "a", "predicted": "b", "count": 1},
                                                   {"gold": "b", "predicted": "c", "count": 1}]
    m = tasks.classification_metrics(gold * 2, pred * 2, 1)
    assert m["examples"] == 12 and m["top_confusions"] == [{"gold": "a", "predicted": "b", "count": 2}]


def test_macro_f1_matches_scikit_learn_with_a_predicted_class_that_is_never_gold():
    gold = ["x", "x", "y", "y"]
    pred = ["x", "z", "y", "x"]
    # x: tp1 fp1 fn1 -> 1/2; y: tp1 fn1 -> 2/3; z: fp1 -> 0, over the classes of gold and prediction, as
    # sklearn's f1_score(gold, pred, average="macro") does
    assert tasks.macro_f1(gold, pred) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)


def test_an_unmatched_answer_is_a_miss_but_no_class():
    gold, pred = ["x", "y"], ["x", UNMATCHED]
    assert tasks.accuracy(gold, pred) == 0.5
    assert tasks.macro_f1(gold, pred) == pytest.approx((1.0 + 0.0) / 2)


def test_choice_and_generation_metrics():
    assert tasks.choice_metrics([0, 1, 2, 3], [0, 1, 0, 0]) == {"examples": 4, "accuracy": 0.5}
    gold = ["SELECT Notes FROM t WHERE Slogan = 'SA'", "The Eiffel Tower", "SELECT COUNT(*) FROM t"]
    pred = ["select notes from t where slogan='SA'", "eiffel tower.", "SELECT COUNT(*) FROM t"]
    sql = tasks.generation_metrics(gold, pred, "sql")
    assert sql["exact_match"] == pytest.approx(1 / 3)
    assert sql["normalized_exact_match"] == pytest.approx(2 / 3)  # spacing and case, not the eiffel text
    text = tasks.generation_metrics(gold, pred, "text")
    assert text["normalized_exact_match"] == pytest.approx(2 / 3)  # articles and punctuation, not the SQL's '='


def test_normalisers():
    assert tasks.normalize_sql("  SELECT  a ,b FROM t WHERE x = ( 1 ) ; ") == "select a,b from t where x=(1)"
    assert tasks.normalize_text("The  Cat, a hat!") == "cat hat"
    assert math.isnan(tasks.accuracy([], []))


def test_matching_a_generated_answer_to_the_label_set():
    labels = [" card_arrival", " card_linking", " card"]
    assert tasks.match_answer(" Card_Arrival.", labels) == 0
    assert tasks.match_answer(" card_linking and more", labels) == 1  # went on after the label
    assert tasks.match_answer(" card", labels) == 2
    assert tasks.match_answer(" cash", labels) is None


def test_the_best_candidate_by_sum_or_mean():
    scores = [(-3.0, 3), (-2.5, 1)]
    assert tasks.pick_best(scores, False) == 1
    assert tasks.pick_best(scores, True) == 0


# ---------------------------------------------------------------- scoring on a tiny model


def test_label_log_likelihoods_are_the_models(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.evaluate.inference import open_model
    from ftkit.recipe.load import build_recipe

    be, tok, _ = open_model(str(tiny_model_dir), "torch", None)
    data = build_recipe({"model": {"path": "m"}, "data": {"path": "-"}}, "t", check_paths=False).data
    scorer = tasks.Scorer(be, tok, data, "completion")
    row = {"prompt": "table: 1-1000181-1\nQ: how many?\nA:"}
    cands = [" SELECT COUNT", " nothing at all"]
    # two examples of different lengths: their candidates share padded batches
    rows = [row, {"prompt": "table: 2-17\nQ: which player has the most points of all the players here?\nA:"}]
    got = scorer.logliks([[scorer.with_completion(r, c) for c in cands] for r in rows])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for r, group in zip(rows, got):
        for (ll, n), c in zip(group, cands):
            p = tok(r["prompt"])["input_ids"]
            a = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p + a])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            by_hand = sum(logp[len(p) - 1 + j, a[j]].item() for j in range(len(a)))
            assert n == len(a) and ll == pytest.approx(by_hand, abs=1e-4)
    assert scorer.prompt_ids(scorer.with_completion(row, cands[0])) == tok(row["prompt"])["input_ids"]


@pytest.mark.parametrize("as_chat", [False, True], ids=["completion", "chat"])
def test_classification_end_to_end_learns_the_labels(tiny_model_dir, tmp_path, as_chat):
    """A tiny model trained on word -> class pairs scores the classes it learnt; base vs adapter saved as JSON."""
    from builders import recipe_file
    from typer.testing import CliRunner

    from ftkit.cli import app

    words = {"apple": "fruit", "pear": "fruit", "plum": "fruit", "cat": "animal", "dog": "animal", "cow": "animal"}
    rows = [{"word": w, "kind": k} for w, k in words.items()]
    data = tmp_path / "words"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_file(tmp_path, tiny_model_dir, data, name="words",
                         data={"label_field": "kind", "prompt_template": "word: {word}\nclass:", "completion_template": " {label}",
                               "max_seq_length": 96, **({"format": "chat", "chat_format": "chatml"} if as_chat else {})},
                         train={"iters": 30, "lr": 1e-2, "steps_per_eval": 30, "save_every": 30},
                         method={"rank": 8, "alpha": 16})
    with recipe.open("a") as f:
        f.write('[eval]\ntask = "classification"\n')
    runner = CliRunner()
    out = runner.invoke(app, ["train", str(recipe), "--backend", "torch", "--json"])
    assert out.exit_code == 0, out.output
    adapter = json.loads(out.stdout.strip().splitlines()[-1])["adapter"]
    ev = runner.invoke(app, ["eval", str(recipe), "--adapter", adapter, "--backend", "torch", "--json"])
    assert ev.exit_code == 0, ev.output
    res = json.loads(ev.stdout)
    after, before = res["after"]["tasks"]["words"], res["before"]["tasks"]["words"]
    assert after["examples"] == 6 and after["labels"] == 2
    assert after["accuracy"] == 1.0 and after["macro_f1"] == 1.0 and after["top_confusions"] == []
    assert before["accuracy"] < 1.0
    saved = json.loads(open(res["saved"]).read())
    assert saved["after"]["tasks"]["words"]["accuracy"] == 1.0 and saved["split"] == "test"
    gen = runner.invoke(app, ["eval", str(recipe), "--adapter", adapter, "--backend", "torch", "--json", "--no-compare",
                              "--set", "eval.scoring=generate", "--set", "eval.max_tokens=4"])
    g = json.loads(gen.stdout)["tasks"]["words"]
    assert "before" not in json.loads(gen.stdout) and g["scoring"] == "generate" and g["accuracy"] == 1.0


def test_label_scores_agree_on_torch_and_mlx(tiny_model_dir):
    pytest.importorskip("mlx")
    from ftkit.evaluate.inference import open_model
    from ftkit.recipe.load import build_recipe

    data = build_recipe({"model": {"path": "m"}, "data": {"path": "-"}}, "t", check_paths=False).data
    row = {"prompt": "table: 1-1000181-1\nQ: how many?\nA:"}
    cands = [" SELECT COUNT", " SELECT Notes", " nothing"]
    scores = []
    for name in ("torch", "mlx"):
        be, tok, _ = open_model(str(tiny_model_dir), name, None)
        scorer = tasks.Scorer(be, tok, data, "completion")
        (group,) = scorer.logliks([[scorer.with_completion(row, c) for c in cands]])
        scores.append(group)
        gold = scorer.with_completion(row, cands[0])
        assert scorer.generate(gold, 4, ["\n"]) == scorer.generate(gold, 4, ["\n"])
    for (a, n), (b, m) in zip(*scores):
        assert n == m and a == pytest.approx(b, rel=1e-4)


@pytest.mark.parametrize("kind", ["lora", "prompt"])
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_row_losses_are_each_rows_own_loss(tmp_path, tiny_model_dir, small_data, kind, backend):
    """A padded batch's per-row sums equal each row scored alone (a soft prompt's positions left out)."""
    if backend == "mlx":
        pytest.importorskip("mlx")
    import numpy as np
    from builders import recipe_file

    from ftkit.backend.registry import get_backend
    from ftkit.data.batch import make_batch
    from ftkit.recipe.load import load_recipes
    from ftkit.train.prepare import prepare

    (recipe,) = load_recipes([recipe_file(tmp_path, tiny_model_dir, small_data, method={"kind": kind})])
    prep = prepare(recipe)
    be = get_backend(backend)
    be.load(recipe, prep.model_path, adapter=None, train=True)
    be.set_adapter_tensors({k: np.random.default_rng(0).normal(0, 0.05, v.shape).astype(np.float32)
                            for k, v in be.adapter_tensors().items()})
    examples = sorted(prep.splits.valid[:5], key=lambda e: len(e.ids))  # lengths differ: padding in the batch
    assert len({len(e.ids) for e in examples}) > 1
    pad = prep.tokenizer.pad_token_id
    rows = be.row_losses(make_batch(examples, pad))
    alone = [be.eval_loss(make_batch([e], pad)) for e in examples]
    np.testing.assert_allclose(rows, alone, rtol=2e-5)
