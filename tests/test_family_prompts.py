"""Soft prompts on every model family of tests/families.py, on both backends.

For each family a tiny model (random weights, query/key sharpened so that positions and masks matter)
trains a soft prompt for a few steps from one recipe on torch (PEFT) and on MLX (mlx-lm), and:

- the training losses agree step by step;
- the prompt each backend trained gives the same logits on the other backend and in plain PEFT, so the
  common adapter's `prompt_embeddings` mean the same on both (Gemma's scaled embeddings included);
- generation through each backend's KV cache (prompt prepended at the first call only) gives the
  logits of one full forward pass.

A family whose mlx-lm model has no `model.embed_tokens` (none of the 18) is refused before loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from builders import recipe_file
from families import FAMILIES, build_family, sharpen

from ftkit.evaluate.inference import load_for_inference
from ftkit.models.tokenizer import load_tokenizer
from ftkit.recipe.load import build_recipe, load_recipes
from ftkit.train.loop import Trainer
from ftkit.train.prepare import prepare

N_VIRTUAL = 6
STEPS = 3
# Long enough that n_virtual + T passes the tiny models' 32-token sliding windows.
TEXT = "table: 1-10015132-11\ncolumns: Player, No., Nationality, Position, Years in Toronto\nQ: Which player wore number 4?\nA: SELECT"
LOSS_RTOL = 1e-5
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, wikisql_dir) -> Path:
    """A few WikiSQL rows cut to 40-70 tokens: padded batches (so MLX's output head runs at the target
    positions only), every row still longer than the 32-token windows with the prompt."""
    d = tmp_path_factory.mktemp("prompt-data")
    for split, n in (("train", 8), ("valid", 2), ("test", 2)):
        texts = [json.loads(line)["text"] for line in (wikisql_dir / f"{split}.jsonl").read_text().splitlines()[:n]]
        rows = [json.dumps({"text": t[: 80 + 30 * (i % 3)]}) for i, t in enumerate(texts)]
        (d / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir, data_dir):
    """family -> (model folder, {backend: (adapter folder, training losses)}), trained on first use."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(family: str):
        if family not in cache:
            tmp = tmp_path_factory.mktemp(family)
            model = build_family(family, tmp / "model", tokenizer_dir)
            sharpen(model)
            cache[family] = model, {b: train(tmp, model, data_dir, b) for b in ("torch", "mlx")}
        return cache[family]

    return get


def train(tmp: Path, model: Path, data: Path, backend: str) -> tuple[Path, list[float]]:
    method = {"kind": "prompt", "num_virtual_tokens": N_VIRTUAL, "prompt_init_text": "Translate the question to SQL"}
    p = recipe_file(tmp, model, data, name=backend, method=method, data={"max_seq_length": 64},
                    train={"iters": STEPS, "batch_size": 4, "lr": 3e-2, "save_every": STEPS, "steps_per_eval": 100, "val_batches": 1})
    (recipe,) = load_recipes([p])
    result = Trainer(prepare(recipe), backend, quiet=True).run()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result.adapter, [r["loss"] for r in rows if r["kind"] == "train"]


def loaded(backend: str, model: Path, adapter: Path | None):
    recipe = build_recipe({"model": {"path": str(model)}, "data": {"path": "-"}, "torch": {"precision": "fp32"}}, "t", check_paths=False)
    return load_for_inference(recipe, backend, adapter, model, load_tokenizer(model))


def full_logits(be, ids: list[int]) -> np.ndarray:
    """One logit row per input token, the soft prompt's positions dropped."""
    if be.name == "torch":
        with torch.no_grad():
            return be.model(input_ids=torch.tensor([ids])).logits[0, be.n_virtual :].float().numpy()
    return np.array(be.tuned(mx.array([ids]))[0].astype(mx.float32))


def cached_logits(be, ids: list[int], cut: int) -> np.ndarray:
    """The last position's logits after feeding `ids` in two calls through the backend's KV cache."""
    _, state = be.next_logits(ids[:cut], None)
    last, _ = be.next_logits(ids[cut:], state)
    return last


def peft_logits(model: Path, adapter: Path, ids: list[int]) -> np.ndarray:
    """Plain transformers + PEFT, no ftkit code in the path."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), str(adapter))
    peft.eval()
    with torch.no_grad():
        return peft(input_ids=torch.tensor([ids])).logits[0, N_VIRTUAL:].numpy()


# 18 families x 2 backends x (train + 2 loads): about a minute of CPU, three minutes on a busy 2-core box
@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_training_losses_agree_on_both_backends(trained, family):
    _, runs = trained(family)
    loss_t, loss_m = np.array(runs["torch"][1]), np.array(runs["mlx"][1])
    assert len(loss_t) == len(loss_m) == STEPS
    rel = np.abs(loss_t - loss_m) / loss_t
    assert rel.max() < LOSS_RTOL, (family, rel.max(), loss_t, loss_m)
    assert loss_t[-1] < loss_t[0]  # it trained: two flat lines would agree for nothing


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_prompt_trained_on_either_backend_gives_the_same_logits_on_both_and_in_peft(trained, family):
    model, runs = trained(family)
    ids = load_tokenizer(model)(TEXT).input_ids
    assert N_VIRTUAL + len(ids) > 32  # past the sliding windows
    for source in ("mlx", "torch"):
        adapter = runs[source][0]
        on = {b: loaded(b, model, adapter) for b in ("torch", "mlx")}
        logits = {b: full_logits(be, ids) for b, be in on.items()}
        with on["torch"].model.disable_adapter(), torch.no_grad():
            base = on["torch"].model(input_ids=torch.tensor([ids])).logits[0].numpy()
        assert np.abs(logits["mlx"] - base).max() > 1e-2, family  # the prompt matters, so agreement means something
        diff = np.abs(logits["mlx"] - logits["torch"]).max()
        assert diff <= LOGITS_ATOL, (family, source, diff)
        if source == "mlx":  # the torch one was written by PEFT itself
            assert np.abs(peft_logits(model, adapter, ids) - logits["torch"]).max() <= LOGITS_ATOL, family
        for b, be in on.items():  # the KV cache holds the prompt after the first call
            assert np.abs(cached_logits(be, ids, len(ids) // 2) - logits[b][-1]).max() <= LOGITS_ATOL, (family, b)


def test_a_family_without_embed_tokens_is_refused_before_any_weight_is_read(tmp_path):
    """mlx-lm's GPT-2 keeps its table in `wte`. The folder holds no weights at all: refusing it by name
    (rather than failing to read weights) shows the check runs before loading."""
    from ftkit.backend.registry import get_backend
    from ftkit.common.errors import FtkitError

    config = {"model_type": "gpt2", "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 64,
              "layer_norm_epsilon": 1e-5, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(config))
    recipe = build_recipe({"model": {"path": str(tmp_path)}, "method": {"kind": "prompt"}, "data": {"path": "-"}}, "t", check_paths=False)
    with pytest.raises(FtkitError, match=r"model family 'gpt2'.*no model.embed_tokens.*method.kind = 'lora', or --backend torch"):
        get_backend("mlx").load(recipe, tmp_path, adapter=None, train=True)
