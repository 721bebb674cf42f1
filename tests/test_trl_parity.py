"""ftkit's DPO/IPO/ORPO steps against TRL's own trainers (trl 1.16: DPOTrainer; ORPOTrainer from trl.experimental)
on the tiny Llama: the same rows (TRL tokenizes them itself; the ids must equal ftkit's data pipeline's), the same
starting LoRA tensors, AdamW at a constant LR with ftkit's clipping, the same pairs in each step.

ftkit runs at the backend level (load, set_reference, pair_forward_backward, optimizer_step), as the loop does.
TRL's reference for a PeftModel handed in is a frozen copy of its starting adapter ("ref"), and for a peft_config
the base with the adapter off: ftkit's set_reference(adapter) and set_reference(None).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("datasets")

from builders import REPO

from ftkit.adapters import init
from ftkit.backend.registry import get_backend
from ftkit.data.pairs import pair_micro_batches
from ftkit.data.preference import encode_pair
from ftkit.models.tokenizer import load_tokenizer
from ftkit.recipe.load import build_recipe

pytestmark = pytest.mark.slow

LR = 1e-2
PAIRS = REPO / "data" / "commonsenseqa_pairs" / "train.jsonl"
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def rows(n: int, prompt: str | None = None) -> list[dict]:
    """The shipped CommonsenseQA pairs ("...Answer:" -> " ignore" / " enforce"), optionally with another prompt."""
    out = []
    for line in PAIRS.read_text().splitlines()[:n]:
        r = json.loads(line)
        out.append({"prompt": prompt or r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
    return out


def recipe(model_dir: Path, **train):
    body = {"model": {"path": str(model_dir)}, "data": {"path": "-", "max_seq_length": 512},
            "method": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
            "train": {"seed": 0, "lr": LR, "optimizer": "adamw", "scheduler": "constant", "max_grad_norm": 1.0, **train},
            "torch": {"precision": "fp32"}}
    return build_recipe(body, "parity", check_paths=False)


def ftkit_steps(model_dir: Path, tmp_path: Path, data: list[dict], batch: int, reference: str, **train):
    """(the pairs, the starting adapter tensors, ftkit's LoRA config (PEFT's), each step's metrics averaged over its pairs)."""
    r = recipe(model_dir, **train)
    tok = load_tokenizer(model_dir)
    pairs = [encode_pair(row, tok, r.data).pair for row in data]
    be = get_backend("torch")
    be.load(r, model_dir, adapter=None, train=True)
    rng = np.random.default_rng(1)  # B off zero: the policy is not the base at step 0
    start = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) if "lora_B" in k else v
             for k, v in init.draw(be.adapter_tensors(), 0).items()}
    be.set_adapter_tensors(start)
    if reference == "adapter":  # a DPO stage after an SFT one: it starts from the adapter and is held to it
        be.save_adapter(tmp_path / "start")
        be = get_backend("torch")
        be.load(r, model_dir, adapter=tmp_path / "start", train=True)
    if r.train.objective == "dpo":
        be.set_reference(tmp_path / "start" if reference == "adapter" else None)
    be.start_training()
    out = []
    for i in range(0, len(pairs), batch):
        (pb,) = pair_micro_batches(pairs[i : i + batch], batch, tok.pad_token_id, False)
        sums = be.pair_forward_backward(pb, 1.0 / batch)
        be.optimizer_step(LR)
        out.append({k: float(v) / batch for k, v in sums.items()})
    return pairs, start, copy.deepcopy(be.model.peft_config["default"]), out


def trl_args(config_cls, tmp_path: Path, batch: int, steps: int, **keys):
    # AdamW (torch's), no weight decay, constant LR, no warmup, ftkit's clipping; fp32, no checkpointing, no dropout.
    return config_cls(output_dir=str(tmp_path / "trl"), learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                      weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999,
                      adam_epsilon=1e-8, per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
                      bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
                      seed=0, use_cpu=True, disable_tqdm=True, disable_dropout=True, **keys)


def in_order(trainer_cls):
    """The trainer with its rows in file order, so that each step holds the pairs ftkit's step holds."""
    from torch.utils.data import SequentialSampler

    class InOrder(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    return InOrder


def trl_logs(trainer) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def assert_steps_agree(ours: list[dict], theirs: list[dict], names) -> None:
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in names:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), f"step {step + 1} {k}: ftkit {a[k]} TRL {b[k]}"


def as_torch(tensors: dict[str, np.ndarray]) -> dict:
    return {k: torch.from_numpy(v) for k, v in tensors.items()}


@pytest.mark.parametrize(("reference", "loss_type"), [("base", "sigmoid"), ("adapter", "ipo")],
                         ids=["adapter-off-sigmoid", "start-adapter-ipo"])
def test_dpo_steps_equal_trl_dpo_trainer(tiny_model_dir, tmp_path, reference, loss_type):
    from datasets import Dataset
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    batch, steps = 4, 3
    data = rows(batch * steps)
    pairs, start, lora, ours = ftkit_steps(tiny_model_dir, tmp_path, data, batch, reference, objective="dpo", beta=0.1, loss_type=loss_type)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if reference == "adapter":
        model = get_peft_model(model, lora)
        set_peft_model_state_dict(model, as_torch(start))
    args = trl_args(DPOConfig, tmp_path, batch, steps, beta=0.1, loss_type=[loss_type], max_length=None)
    trainer = in_order(DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(data),
                                   processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                                   peft_config=None if reference == "adapter" else lora)
    if reference == "base":
        set_peft_model_state_dict(trainer.model, as_torch(start))
    # TRL tokenized the text rows itself: the same ids and response masks as ftkit's preference encoding
    for p, row in zip(pairs, trainer.train_dataset):
        n = len(row["prompt_ids"])
        assert p.chosen.ids == row["prompt_ids"] + row["chosen_ids"] and p.rejected.ids == row["prompt_ids"] + row["rejected_ids"]
        assert p.chosen.mask == [0] * n + [1] * len(row["chosen_ids"]) and p.rejected.mask == [0] * n + [1] * len(row["rejected_ids"])
    theirs = trl_logs(trainer)
    assert_steps_agree(ours, theirs, METRICS)
    assert abs(ours[0]["rewards/margins"]) > 1e-3 if reference == "base" else ours[0]["rewards/margins"] == 0.0
    assert abs(ours[-1]["loss"] - ours[0]["loss"]) > 1e-3  # it trained


def test_orpo_steps_equal_trl_orpo_trainer(tiny_model_dir, tmp_path):
    """TRL's ORPO NLL term runs over the prompt's tokens too, averaged over the batch's tokens; ftkit's over each
    response's tokens, averaged per pair. With a one-token prompt and one pair a step the two are the same loss."""
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental"
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    steps, lam = 4, 0.5
    data = rows(steps, prompt="Q")
    pairs, start, lora, ours = ftkit_steps(tiny_model_dir, tmp_path, data, 1, "base", objective="orpo", orpo_lambda=lam)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = trl_args(ORPOConfig, tmp_path, 1, steps, beta=lam, remove_unused_columns=False)
    trainer = in_order(ORPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(data),
                                    processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), peft_config=lora)
    set_peft_model_state_dict(trainer.model, as_torch(start))
    for p, row in zip(pairs, trainer.train_dataset):
        assert p.chosen.ids == row["chosen_input_ids"] and p.rejected.ids == row["rejected_input_ids"]
    theirs = trl_logs(trainer)
    assert_steps_agree(ours, theirs, (*METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen"))
