"""The baseline ftkit's torch backend is measured against: a plain `transformers.Trainer` + PEFT LoRA script,
written the way the PEFT and transformers docs show it, with nothing tuned for speed.

    python bench/baseline_trainer.py CONFIG.json      # bench/speed.py writes the config and runs this

CONFIG.json holds the shared settings (bench/harness/settings.py): model folder, data file (`{"text"}` or
`{"messages"}` jsonl), format, steps, batch size, gradient accumulation, lr, scheduler, weight decay,
max_grad_norm, LoRA rank/alpha/dropout, precision, quantization, gradient checkpointing, seed, output dir,
and optionally `valid` (a jsonl file of the same format, evaluated once after training, outside the timed loop).
It writes `result.json` there: the training loop's start and end time, the last logged loss, the examples
and target tokens the data collator handed to the model, the loss log, the frozen weights' dtype and, with
`valid`, `Trainer.evaluate`'s `eval_loss` as `valid_loss`.

What a user gets from the docs, and so what this does: the rows are tokenized once up front (a list,
as `datasets.map` would hold them), labels are the input ids with -100 on what is not trained on (the
prompt of a chat: everything up to the assistant turn, and the newline the template writes after the
turn's end token, which generation never produces), `DataCollatorForSeq2Seq` pads every batch to its
longest row, and `Trainer` runs AdamW with its default sampler (random, seeded) and loss.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


def tokenize(row: dict, tokenizer, fmt: str, max_length: int) -> dict:
    if fmt == "text":
        ids = tokenizer(row["text"])["input_ids"]
        if ids[-1] != tokenizer.eos_token_id:
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        messages = row["messages"]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        labels = [-100] * n_prompt + ids[n_prompt:]
        if len(ids) >= 2 and ids[-2] == tokenizer.eos_token_id and not tokenizer.decode(ids[-1]).strip():
            labels[-1] = -100  # the newline the template writes after <|im_end|>: generation stops before it
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class CountingCollator(DataCollatorForSeq2Seq):
    """DataCollatorForSeq2Seq that also counts what it hands over (for the benchmark's cross-check)."""

    examples = 0
    target_tokens = 0

    def __call__(self, features, return_tensors=None):
        batch = super().__call__(features, return_tensors)
        CountingCollator.examples += batch["labels"].shape[0]
        CountingCollator.target_tokens += int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
        return batch


class Clock(TrainerCallback):
    start = end = None
    losses: list = []
    report_ends: list = []

    def on_train_begin(self, args, state, control, **kwargs):
        Clock.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        Clock.end = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            Clock.report_ends.append(time.time())
            Clock.losses.append({"step": state.global_step, "loss": float(logs["loss"])})


def main(config: str | None = None) -> None:
    cfg = json.loads(Path(config or sys.argv[1]).read_text())
    # class-level tallies: zeroed so that bench/cpu_bf16.py --smoke can run several trainings in one process
    CountingCollator.examples = CountingCollator.target_tokens = 0
    Clock.start, Clock.end, Clock.losses, Clock.report_ends = None, None, [], []
    out = Path(cfg["output_dir"])
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in Path(cfg["data"]).read_text().splitlines() if line.strip()]
    train = [tokenize(r, tokenizer, cfg["format"], cfg["max_seq_length"]) for r in rows]

    kwargs = {"dtype": dtype}
    if cfg["quantize"] == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], **kwargs)
    if cfg["quantize"] == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg["gradient_checkpointing"])
    lora = LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"], target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)

    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        learning_rate=cfg["lr"],
        lr_scheduler_type=cfg["scheduler"],
        warmup_steps=0,
        weight_decay=cfg["weight_decay"],
        max_grad_norm=cfg["max_grad_norm"] or 0.0,  # 0: no clipping
        optim="adamw_torch",
        bf16=cfg["precision"] == "bf16",
        gradient_checkpointing=cfg["gradient_checkpointing"],
        logging_steps=cfg["report_every"],
        save_strategy="no",
        report_to="none",
        seed=cfg["seed"],
        use_cpu=not cuda,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[Clock()],
                      data_collator=CountingCollator(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    counted = {"examples": CountingCollator.examples, "own_target_tokens": CountingCollator.target_tokens}  # before validation's batches
    valid = None
    if cfg.get("valid"):
        rows = [json.loads(line) for line in Path(cfg["valid"]).read_text().splitlines() if line.strip()]
        valid = trainer.evaluate([tokenize(r, tokenizer, cfg["format"], cfg["max_seq_length"]) for r in rows])["eval_loss"]
    # the end of the last step as the log sees it: after its loss is read back (on a GPU, after the step's kernels ran)
    end = Clock.report_ends[-1] if Clock.report_ends and Clock.losses[-1]["step"] == trainer.state.global_step else Clock.end
    result = {"start": Clock.start, "end": end, "report_ends": Clock.report_ends, "steps": trainer.state.global_step,
              "final_loss": Clock.losses[-1]["loss"] if Clock.losses else None, "losses": Clock.losses,
              **counted, "valid_loss": valid,
              "frozen_dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype).replace("torch.", ""),
              "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
