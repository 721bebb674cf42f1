"""Preference tuning through the one loop, end to end (recipes, `ftkit train`, stages, resume, eval): DPO and ORPO
on both backends, the same losses on both, the same adapter format. The math itself is tested per backend
(test_objectives, test_preference_torch, test_preference_mlx, test_preference_cross)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from builders import recipe_file
from safetensors.numpy import load_file


def pairs_from_wikisql(src: Path, dest: Path, n_train: int = 24, n_valid: int = 8) -> Path:
    """Pairs from WikiSQL rows: the question is the prompt, its SQL the chosen answer, another row's SQL the rejected."""
    rows = [json.loads(line)["text"] for line in (src / "train.jsonl").read_text().splitlines()[: n_train + n_valid]]
    rng = random.Random(0)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, text in enumerate(rows):
        prompt, sql = text.rsplit("\nA:", 1)
        other = rows[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)].rsplit("\nA:", 1)[1]
        out.append({"prompt": prompt + "\nA:", "chosen": sql, "rejected": other})
    for split, part in (("train", out[:n_train]), ("valid", out[n_train:])):
        (dest / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return dest


@pytest.fixture
def pair_data(tmp_path, wikisql_dir) -> Path:
    return pairs_from_wikisql(wikisql_dir, tmp_path / "pairs")


def dpo_recipe(tmp_path, model, data, name="dpo", /, **sections):
    train = {"objective": "dpo", "iters": 6, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "steps_per_report": 1,
             "steps_per_eval": 3, "save_every": 3, "val_batches": 2, "beta": 0.1, **sections.pop("train", {})}
    return recipe_file(tmp_path, model, data, name, train=train, **sections)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(recipe: Path, backend: str, **kw):
    from ftkit.recipe.load import load_recipes
    from ftkit.train.loop import Trainer
    from ftkit.train.prepare import prepare

    return Trainer(prepare(load_recipes([recipe])[0]), backend, quiet=True).run(**kw)


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def test_dpo_on_torch_starts_at_log2_logs_trls_metrics_and_resumes_exactly(tmp_path, tiny_model_dir, pair_data):
    whole = train(dpo_recipe(tmp_path, tiny_model_dir, pair_data, "whole", method={"dropout": 0.1}), "torch")
    got = records(whole.run_dir)
    steps = [r for r in got if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    # The policy starts as the reference (LoRA's B = 0): loss log 2, rewards 0.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for r in steps + [r for r in got if r["kind"] == "valid"]:
        assert all(k in r and math.isfinite(r[k]) for k in ("loss", *METRICS)), r
    assert steps[-1]["loss"] < math.log(2) and steps[-1]["rewards/margins"] > 0  # it learns the preference
    valid = [r for r in got if r["kind"] == "valid"]
    assert valid[0]["step"] == 0 and valid[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)

    part = dpo_recipe(tmp_path, tiny_model_dir, pair_data, "part", method={"dropout": 0.1})
    assert train(part, "torch", stop_after=4).steps == 4
    done = train(part, "torch", resume="auto")
    a, b = load_file(str(done.adapter / "adapter_model.safetensors")), load_file(str(whole.adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert [r for r in records(done.run_dir) if r["kind"] == "train"][-1]["loss"] == steps[-1]["loss"]
    from ftkit.ops.report import build

    page = build(whole.run_dir)
    assert 'id="plot-rewards"' in page and "valid-rewards-accuracies" in page  # training and validation reward curves
    meta = json.loads((whole.adapter / "ftkit.json").read_text())
    assert meta["recipe"]["train"]["objective"] == "dpo"


def test_dpo_mlx_and_torch_agree_over_20_steps_and_the_mlx_adapter_gives_the_same_logits_on_torch(tmp_path, tiny_model_dir, pair_data):
    pytest.importorskip("mlx.core")
    from builders import logits_on

    kw = dict(train={"iters": 20, "batch_size": 2, "grad_accum": 1, "steps_per_eval": 20, "save_every": 20, "val_batches": 1},
              data={"packing": "off"})
    runs = {b: train(dpo_recipe(tmp_path, tiny_model_dir, pair_data, b, **kw), b) for b in ("torch", "mlx")}
    losses = {b: np.array([r["loss"] for r in records(run.run_dir) if r["kind"] == "train"]) for b, run in runs.items()}
    assert len(losses["torch"]) == 20
    np.testing.assert_allclose(losses["mlx"], losses["torch"], rtol=1e-4)
    margins = {b: [r["rewards/margins"] for r in records(run.run_dir) if r["kind"] == "train"] for b, run in runs.items()}
    np.testing.assert_allclose(margins["mlx"], margins["torch"], rtol=1e-3, atol=1e-5)
    prompt = json.loads((pair_data / "valid.jsonl").read_text().splitlines()[0])["prompt"]
    on_mlx = logits_on("mlx", tiny_model_dir, runs["mlx"].adapter, prompt)
    on_torch = logits_on("torch", tiny_model_dir, runs["mlx"].adapter, prompt)
    np.testing.assert_allclose(on_torch, on_mlx, rtol=1e-4, atol=1e-4)
    print(f"\nDPO, 20 steps: largest relative loss difference MLX vs torch {np.max(np.abs(losses['mlx'] / losses['torch'] - 1)):.2e}")


def test_sft_then_dpo_stages_orpo_and_eval_base_vs_adapter(tmp_path, tiny_model_dir, small_data, pair_data):
    from ftkit.evaluate.evaluation import evaluate_recipe
    from ftkit.recipe.load import load_recipes
    from ftkit.train.stages import run_stages

    sft = recipe_file(tmp_path, tiny_model_dir, small_data, "sft", train={"iters": 3, "save_every": 3, "steps_per_eval": 3})
    dpo = dpo_recipe(tmp_path, tiny_model_dir, pair_data, "dpo2", train={"iters": 3, "save_every": 3})
    first, second = run_stages(load_recipes([sft, dpo]), "torch", quiet=True)
    steps = [r for r in records(second.run_dir) if r["kind"] == "train"]
    # The second stage starts from the first's adapter, which is also its reference: loss log 2 again at step 1.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    from ftkit.train.prepare import banner, prepare, reference_of

    prep = prepare(load_recipes([dpo])[0])
    assert reference_of(prep, first.adapter) == first.adapter
    assert f"reference: the starting adapter {first.adapter}, frozen" in banner(prep, "torch", {}, None, first.adapter)

    orpo = dpo_recipe(tmp_path, tiny_model_dir, pair_data, "orpo", train={"objective": "orpo", "iters": 3, "save_every": 3})
    got = records(train(orpo, "torch").run_dir)
    assert all(k in got[-1] for k in ("nll_loss", "log_odds_ratio", "log_odds_chosen", *METRICS))

    # The same adapter format as SFT: PEFT loads it as it is, and fuse merges it.
    from ftkit.ops.fuse import fuse
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), second.adapter)
    fused = fuse(second.adapter, tmp_path / "fused", model=str(tiny_model_dir), backend_name="torch", dequantize=False, force=False)
    assert (tmp_path / "fused" / "config.json").is_file(), fused

    result = evaluate_recipe(load_recipes([dpo])[0], "torch", second.adapter, split="valid")
    assert result["before"]["preference_accuracy"] is not None and 0 <= result["preference_accuracy"] <= 1
    assert set(result) >= {"preference_accuracy", "preference_accuracy_per_token", "margin", "loss"}


def test_pair_batches_padded_and_packed_map_every_target_to_its_sequence_and_refuse_an_empty_response():
    from ftkit.common.errors import DataError
    from ftkit.data.batch import Example, Pair
    from ftkit.data.batching import share
    from ftkit.common.distributed import World
    from ftkit.data.pairs import pair_micro_batches

    pairs = [Pair(Example([1, 2, 3, 4], [0, 0, 1, 1]), Example([1, 2, 5], [0, 0, 1])),
             Pair(Example([1, 7, 8], [0, 1, 1]), Example([1, 7, 9, 9, 9], [0, 1, 1, 1, 1]))]
    for packing in (False, True):
        (pb,) = pair_micro_batches(pairs, 2, 0, packing)
        assert pb.tokens_per_sequence.tolist() == [2, 1, 2, 4] and pb.n_pairs == 2
        assert ((pb.sequence >= 0) == (pb.batch.mask > 0)).all()
        for s in range(4):  # each sequence's targets, in order, are its own response tokens
            ex = [pairs[s // 2].chosen, pairs[s // 2].rejected][s % 2]
            want = [t for t, m in zip(ex.ids[1:], ex.mask[1:]) if m]
            assert pb.batch.targets[pb.sequence == s].tolist() == want
    assert pair_micro_batches(pairs, 2, 0, True)[0].batch.inputs.shape[0] == 3  # packed: fewer rows than 4
    part = share(pairs, 1, 0, False, World())
    assert (part.pairs, part.weight, part.targets, len(part.batches)) == (2, 2, 9, 2)  # the step's loss is a mean over pairs
    with pytest.raises(DataError, match="rejected response with no target token"):
        pair_micro_batches([Pair(Example([1, 2, 3], [0, 1, 1]), Example([1, 2, 3], [0, 0, 0]))], 1, 0, False)
