"""TOML recipe -> validated, typed `Recipe`.

Every default lives in the models below (`ftkit recipe defaults` prints them). Errors from all sources
are collected and reported together, each naming the file, the key and what is allowed, before any
model is loaded.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)

METHODS = ("lora", "dora", "full", "prompt", "prefix")


ADAPTER_METHODS = ("lora", "dora", "prompt", "prefix")


# Other tools' names for ftkit's keys (transformers' TrainingArguments, PEFT, TRL, axolotl, LLaMA-Factory,
# mlx-lm): an unknown key found here is answered with the ftkit key, whichever section it was written in.
KEY_ALIASES: dict[str, str] = {
    **dict.fromkeys(["learning_rate", "learningrate", "peak_lr"], "train.lr"),
    **dict.fromkeys(["num_epochs", "num_train_epochs", "epoch", "n_epochs"], "train.epochs"),
    **dict.fromkeys(["max_steps", "num_steps", "steps", "iterations", "num_iters", "total_steps"], "train.iters"),
    **dict.fromkeys(["per_device_train_batch_size", "train_batch_size", "micro_batch_size", "batch", "bs"], "train.batch_size"),
    **dict.fromkeys(["gradient_accumulation_steps", "gradient_accumulation", "accumulation_steps", "grad_accumulation"], "train.grad_accum"),
    **dict.fromkeys(["lr_scheduler_type", "lr_scheduler", "lr_schedule", "schedule"], "train.scheduler"),
    **dict.fromkeys(["warmup_ratio", "warmup_steps", "num_warmup_steps"], "train.warmup"),
    **dict.fromkeys(["optim", "optimiser"], "train.optimizer"),
    **dict.fromkeys(["adam_beta1"], "train.beta1"),
    **dict.fromkeys(["adam_beta2"], "train.beta2"),
    **dict.fromkeys(["grad_clip", "gradient_clipping", "clip_grad_norm"], "train.max_grad_norm"),
    **dict.fromkeys(["save_steps", "steps_per_save", "save_every_n_steps"], "train.save_every"),
    **dict.fromkeys(["eval_steps", "steps_per_validation"], "train.steps_per_eval"),
    **dict.fromkeys(["logging_steps", "log_every"], "train.steps_per_report"),
    **dict.fromkeys(["save_total_limit"], "train.keep_checkpoints"),
    **dict.fromkeys(["eval_batches", "num_eval_batches"], "train.val_batches"),
    **dict.fromkeys(["r", "lora_r", "lora_rank"], "method.rank"),
    **dict.fromkeys(["lora_alpha"], "method.alpha"),
    **dict.fromkeys(["lora_dropout"], "method.dropout"),
    **dict.fromkeys(["target_modules", "lora_target_modules", "lora_modules", "keys"], "method.targets"),
    **dict.fromkeys(["num_layers", "lora_layers", "layers_to_transform"], "method.layers"),
    **dict.fromkeys(["peft_type", "adapter", "fine_tune_type", "finetune_type", "use_dora"], "method.kind"),
    **dict.fromkeys(["resume_adapter_file", "adapter_path", "peft_model_id"], "method.resume_from"),
    **dict.fromkeys(["max_seq_len", "max_length", "sequence_len", "seq_len", "max_len", "cutoff_len", "model_max_length",
                     "context_length", "max_source_length"], "data.max_seq_length"),
    **dict.fromkeys(["dataset", "datasets", "data_path", "dataset_path", "train_file", "data_dir"], "data.path"),
    **dict.fromkeys(["val_set_size", "validation_split", "valid_split", "eval_fraction"], "data.valid_fraction"),
    **dict.fromkeys(["train_on_inputs", "completion_only", "mask_prompt"], "data.train_on"),
    **dict.fromkeys(["chat_template", "conversation_template", "template"], "data.chat_format"),
    **dict.fromkeys(["dataset_text_field"], "data.text_field"),
    **dict.fromkeys(["sample_packing", "pack"], "data.packing"),
    **dict.fromkeys(["base_model", "model_name_or_path", "model_name", "model_id", "model"], "model.path"),
    **dict.fromkeys(["load_in_4bit", "load_in_8bit", "quantization", "bits", "quant"], "model.quantize"),
    **dict.fromkeys(["torch_dtype"], "model.dtype"),
    **dict.fromkeys(["output_dir", "adapter_file", "save_path"], "output.dir"),
    **dict.fromkeys(["bf16", "fp16", "mixed_precision"], "torch.precision"),
    **dict.fromkeys(["dpo_beta", "kl_beta"], "train.beta"),
    **dict.fromkeys(["dpo_loss_type", "loss"], "train.loss_type"),
    **dict.fromkeys(["orpo_alpha", "lambda", "orpo_beta"], "train.orpo_lambda"),
    **dict.fromkeys(["rl", "training_type", "stage", "trainer"], "train.objective"),
    **dict.fromkeys(["wandb_project"], "log.project"),
    **dict.fromkeys(["wandb_run_name"], "log.run_name"),
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    path: str = Field(description="Hub id, local model folder, or a .gguf file (converted once and cached).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    quantize: Literal["none", "nf4", "fp4", "int8", "4bit", "8bit"] = Field(
        "none", description="Quantize the base on load: nf4/fp4/int8 through bitsandbytes on torch (4bit/8bit mean nf4/int8 there); 4bit/8bit on MLX (group size: mlx.quantize_group_size)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto = float32 on CPU, bfloat16 on GPUs that support it."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")


class MethodSection(Section):
    kind: Literal["lora", "dora", "full", "prompt", "prefix"] = Field(
        "lora", description="lora | dora | prompt (soft prompt) | prefix (torch only) | full."
    )
    rank: int = Field(8, ge=1, description="LoRA/DoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: str | list[str] = Field(
        "all-linear", description='Module names to adapt, or "all-linear" (every linear layer in the blocks, as PEFT: not the output head, nor MoE routers or routed experts; ["all-linear", "experts"] adds the experts).'
    )
    layers: int | None = Field(None, ge=1, description="Adapt only the last N decoder blocks (default: all).")
    num_virtual_tokens: int = Field(20, ge=1, description="prompt/prefix: number of virtual tokens.")
    prompt_init_text: str | None = Field(None, description="prompt: initialise the soft prompt from this text.")
    resume_from: str | None = Field(None, description="Start from this adapter folder (common format, PEFT, or mlx-lm).")


class MappingFields(Section):
    """Declarative conversion of a data set's columns into ftkit's formats: the keys [data] and each
    [[data.mix]] source share (ftkit.mapping applies them)."""

    columns: dict[str, str | list[str]] = Field(
        default_factory=dict, description='Names for columns, used as {name} in templates: {label = "category"}; a dotted path reads a nested field '
        '("question.stem"); a list takes the first one a row has (["sentence", "content"]).'
    )
    prompt_template: str | None = Field(None, description='Each row\'s prompt from its columns: "Classify the intent: {text}\\nIntent:".')
    completion_template: str | None = Field(
        None, description='Each row\'s completion: " {label}", " {answer}". Default: the label name, or the right choice\'s label.'
    )
    text_template: str | None = Field(None, description="Each row's text (text format) from its columns.")
    label_field: str | None = Field(
        None, description="Column with the class label (an id into label_names, or the name itself): {label} is its name, and classification eval scores each label."
    )
    label_names: list[str] | str | None = Field(
        None, description="Class names by id: a list, or a file (a JSON list, or one name per line). Unset for a hub data set: its ClassLabel names."
    )
    choices_field: str | None = Field(
        None, description="Column with the answer choices (multiple choice): {label: [...], text: [...]}, a list of {label, text}, or a list of strings. {choices} lists them."
    )
    answer_field: str | None = Field(None, description='Column with the right choice: its label ("A"), index or text. {answer} is its label, {answer_text} its text.')
    choice_format: str = Field("{label}. {text}", description="How {choices} writes each choice.")
    loom: str | None = Field(None, description="A word loom TOML file (OgbujiPT's format) whose sections build each row's prompt; the row's columns fill its {markers}.")
    loom_sections: str | list[str] | None = Field(
        None, description='Loom sections for the prompt: "question", "system question" or "system context question" (default: system_prompt, context, question).'
    )
    max_rows: dict[Literal["train", "valid", "test"], int] = Field(
        default_factory=dict, description="Keep at most N rows of a split, a seeded sample (split_seed): {train = 800, test = 200}. "
        "[data]'s applies to each [[data.mix]] source that sets none."
    )


class MixSource(MappingFields):
    """One more data set trained in the same run ([[data.mix]]), with its own columns and task metrics."""

    name: str = Field(description="Task name: per-task metrics and [eval.tasks.NAME] use it.")
    path: str = Field(description="Folder, file, or `datasets` hub id, as data.path.")
    subset: str | None = Field(None, description="Hub data set configuration name.")
    valid_fraction: float | None = Field(None, ge=0, lt=1, description="Held out for validation when this source has no valid split (default: data.valid_fraction).")
    test_fraction: float | None = Field(None, ge=0, lt=1, description="Held out for test when this source has no test split (default: data.test_fraction).")
    response_template: str | None = Field(None, description="Text rows: the marker that splits each text into prompt and completion.")
    text_field: str | None = Field(None, description="As data.text_field, for this source.")
    prompt_field: str | None = Field(None, description="As data.prompt_field, for this source.")
    completion_field: str | None = Field(None, description="As data.completion_field, for this source.")
    messages_field: str | None = Field(None, description="As data.messages_field, for this source.")
    system_prompt: str | None = Field(None, description="As data.system_prompt, for this source's chat examples.")


class DataSection(MappingFields):
    path: str = Field(description="Folder with train/valid/test files, one file, or a `datasets` hub id.")
    format: Literal["auto", "text", "completion", "chat", "preference"] = Field(
        "auto", description="Example format; auto-detected. preference: rows with a prompt (or messages) and a chosen and a rejected response (train.objective dpo/orpo)."
    )
    train_on: Literal["auto", "completion", "all"] = Field(
        "auto",
        description="Loss on all tokens, or on the completion / assistant turns only. "
        "auto = completion for completion and chat data, and for text data with a response_template; all for other text.",
    )
    response_template: str | None = Field(
        None, description='text data: loss only on what follows this marker (e.g. "\\nA:"), as TRL\'s completion-only collator.'
    )
    max_seq_length: int = Field(2048, ge=8, description="Longer examples are truncated (and counted).")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="Held out for validation when there is no valid split.")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="Held out for test when there is no test split.")
    split_seed: int = Field(0, description="Seed of the train/valid/test split.")
    text_field: str = Field("text", description="Column holding the text (text format).")
    prompt_field: str = Field("prompt", description="Column holding the prompt (completion format).")
    completion_field: str = Field("completion", description="Column holding the completion (completion format).")
    messages_field: str = Field("messages", description="Column holding the messages (chat format).")
    chosen_field: str = Field("chosen", description="Column holding the preferred response (preference format): a string, or a message list.")
    rejected_field: str = Field("rejected", description="Column holding the dispreferred response (preference format): a string, or a message list.")
    subset: str | None = Field(None, description="Hub data set configuration name.")
    add_eos: bool = Field(True, description="Append the EOS token to text and completion examples (chat templates end their own turns).")
    chat_format: Literal["auto", "chatml", "llama3", "mistral", "alpaca", "phi", "gemma"] = Field(
        "auto", description="How chat examples are written: auto = the tokenizer's chat template; or a named format (ftkit generate --format uses the same)."
    )
    system_prompt: str | None = Field(None, description="A system message for chat examples that have none.")
    name: str | None = Field(None, description="Task name of this data in per-task metrics (default: the recipe's name).")
    mix: list[MixSource] = Field(
        default_factory=list, description="More data sets trained in the same run, each with its own columns and metrics ([[data.mix]] tables: name, path, ...)."
    )
    cache: bool = Field(True, description="Keep the tokenized splits in ftkit's cache ($FTKIT_CACHE/tokens), memory-mapped: tokenize once, flat memory.")
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="Several examples per row with attention kept inside each (no padding; the same losses and gradients). "
        "auto = on, except for prompt/prefix tuning (virtual tokens belong to one example); off = one padded example per row."
    )


class TrainSection(Section):
    iters: int | None = Field(None, ge=1, description="Optimizer steps. Give iters or epochs.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training set (sets iters).")
    batch_size: int = Field(4, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (token-weighted).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup: float = Field(0.0, ge=0, description="Warmup: a fraction of the steps if < 1, else a step count.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR as a fraction of lr (linear/cosine).")
    optimizer: Literal[
        "adamw", "adam", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit", "adafactor"
    ] = Field("adamw", description="Optimizer.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm (none: off).")
    seed: int = Field(0, description="Seed for initialisation, data order and dropout.")
    # When to evaluate, report and save. Explicit step counts win over the proportions below.
    steps_per_report: int | None = Field(None, ge=1, description="Report training loss every N steps.")
    steps_per_eval: int | None = Field(None, ge=1, description="Validate every N steps.")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps.")
    val_batches: int | None = Field(None, ge=1, description="Validation batches per evaluation (default: all).")
    evals_per_epoch: float | None = Field(None, gt=0, description="Validations per epoch (axolotl).")
    eval_proportion_of_total: float | None = Field(
        None, gt=0, le=1, description="With evals_per_epoch: fraction of the validation set used per validation."
    )
    reporting_interval_proportion: float = Field(0.01, gt=0, le=1, description="Steps between reports, as a fraction of all steps.")
    validation_interval_proportion: float = Field(0.2, gt=0, le=1, description="Steps between validations, as a fraction of all steps.")
    validations_per_train_item: float | None = Field(
        None, gt=0, description="Validation batches per training step between validations (mlx-tuning-fork)."
    )
    saves_per_epoch: float | None = Field(None, gt=0, description="Checkpoints per epoch (axolotl).")
    adapter_save_interval_proportion: float = Field(0.1, gt=0, le=1, description="Steps between checkpoints, as a fraction of all steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept in the run folder.")
    group_by_length: bool = Field(
        False, description="Put examples of similar length in the same step (less padding when data.packing is off); each example still once per epoch."
    )
    eval_before: bool = Field(True, description="Validate before the first step.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description='A step whose gradients are NaN or inf: "stop" (the run stops before anything non-finite is saved; '
        'the newest checkpoint stays the one --resume auto picks) or "skip" (the update is skipped, as a loss scaler does: the '
        "data position and the RNG still advance; metrics.jsonl counts skipped_steps; 10 skips in a row stop the run). "
        "Weights are checked before every checkpoint and the final adapter either way."
    )
    objective: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description='sft: next-token loss on the targets. dpo / orpo: preference tuning on data.format = "preference" '
        "rows (prompt, chosen, rejected): DPO against a frozen reference (the base with the adapter off, or the adapter the "
        "run starts from), ORPO without one."
    )
    beta: float = Field(0.1, gt=0, description="dpo: the KL penalty's strength beta (TRL's beta); rewards are beta x the log-ratio to the reference.")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="dpo: sigmoid (the DPO paper) or ipo (squared loss on per-token mean log-ratios).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo, sigmoid: the assumed share of flipped labels (conservative DPO).")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo: the weight of the odds-ratio term against the chosen responses' NLL (TRL's ORPO beta).")
    allow_data_change: bool = Field(
        False, description="--resume onto training data that differs from the checkpoint's (its fingerprint of the train "
        "split): the run goes on from the old data position on the new data. Off: such a resume is refused."
    )

    @model_validator(mode="after")
    def _length(self) -> "TrainSection":
        if self.iters is None and self.epochs is None:
            self.epochs = 1.0
        return self


class OutputSection(Section):
    dir: str | None = Field(
        None, description="Run folder: checkpoints, adapter, metrics, plot. Default: runs/<recipe name> under the working directory."
    )


class TorchSection(Section):
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto = cuda if available, else cpu.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision. auto = bf16 on GPUs that support it; on a CPU, bf16 for training only where it has "
        "native bf16 instructions (avx512_bf16, amx_bf16), the rule being that bf16 must train faster than fp32 with the "
        "quickstart's validation loss within 1% of fp32's (measured on this project's avx512_bf16 CPU: 1.3x the speed, +0.7%); "
        "fp32 on other CPUs and, on every CPU, for eval, generate and fuse. The run's switches say what auto chose and why. "
        "bf16 and fp16 keep the trained weights in fp32 (with model.dtype = auto, a frozen base is loaded in that dtype)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field("auto", description="Attention kernel.")
    compile: bool = Field(False, description="torch.compile the model.")
    distributed: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="Several processes (start them with `ftkit launch`): ddp = a model copy per GPU; fsdp = FSDP2, each decoder layer sharded."
    )
    double_quant: bool = Field(True, description="QLoRA (nf4/fp4): quantize the quantization constants too (bitsandbytes double quantization).")


class MlxSection(Section):
    quantize_group_size: int = Field(64, description="Group size when quantizing the base on load.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    compile: Literal["auto"] | bool = Field(
        "auto", description="Compile the training step with mx.compile, rows padded to bucketed lengths (the same losses and weights). "
        "auto: on Apple's GPU; off on a CPU, where the step is matrix-multiply bound and padding cost more than fusion saved."
    )


class LogSection(Section):
    report_to: list[Literal["wandb", "tensorboard", "mlflow"]] = Field(
        default_factory=list, description='Experiment trackers, several at once: ["wandb", "tensorboard", "mlflow"] (each an optional extra: pip install "ftkit[wandb]").'
    )
    project: str = Field("ftkit", description="W&B project, and the MLflow experiment.")
    run_name: str | None = Field(None, description="The tracker run's name (default: the recipe's name).")
    tags: list[str] = Field(default_factory=list, description="W&B tags (MLflow: ftkit.tag.<tag> run tags).")
    entity: str | None = Field(None, description="W&B entity (user or team); default: your W&B default.")
    group: str | None = Field(None, description="W&B run group (sweeps set it to the sweep's name).")
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: $WANDB_MODE, else online. offline writes <run>/wandb/ for a later `wandb sync`."
    )
    tensorboard_dir: str | None = Field(None, description="TensorBoard event files (default: <run>/tensorboard).")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [] if v in ("none", "") else [v]
        return v


class EvalTask(Section):
    """How `ftkit eval` scores one task (all of [eval], or one [eval.tasks.NAME] of a mix)."""

    task: Literal["none", "auto", "classification", "multiple_choice", "generation"] = Field(
        "none", description="Task metrics beside loss/perplexity: classification (accuracy, macro-F1, top confusions), multiple_choice "
        "(accuracy), generation (exact match, normalised exact match); auto: from the data mapping (choices, labels, else generation)."
    )
    scoring: Literal["loglik", "generate"] = Field(
        "loglik", description="classification: score each label's log-likelihood (constrained to the label set), or generate and normalise the answer."
    )
    normalize: Literal["text", "sql"] = Field("text", description="generation: normalised exact match ignores case, punctuation, articles (text) or case and spacing (sql).")
    max_examples: int | None = Field(None, ge=1, description="Score at most N examples of the split (a seeded sample).")
    max_tokens: int = Field(64, ge=1, description="generate scoring: most tokens per answer.")
    length_normalize: bool = Field(False, description="loglik: rank candidates by mean log-probability per token instead of the sum.")
    stop: list[str] | None = Field(None, description="generate scoring: stop strings (default: the format's end of turn, and a newline when no answer has one).")


# [eval.tasks.NAME]: the same keys, each unset (None) where [eval]'s value holds.
EvalTaskOverride = create_model(
    "EvalTaskOverride", __base__=Section,
    **{k: (f.annotation | None, Field(None, description=f"{f.description} Default: [eval]'s.")) for k, f in EvalTask.model_fields.items()},
)


class EvalSection(EvalTask):
    split: Literal["test", "valid", "train"] = Field("test", description="The split `ftkit eval` scores (--split overrides).")
    top_confusions: int = Field(5, ge=0, description="classification: how many of the most frequent (gold, predicted) confusions to list.")
    seed: int = Field(0, description="Seed of the max_examples sample.")
    tasks: dict[str, EvalTaskOverride] = Field(default_factory=dict, description="Per task of a [[data.mix]] (by name): keys as in [eval], which are the defaults.")


class Recipe(Section):
    model: ModelSection
    method: MethodSection = MethodSection()
    data: DataSection
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()
    torch: TorchSection = TorchSection()
    mlx: MlxSection = MlxSection()
    eval: EvalSection = EvalSection()
    log: LogSection = LogSection()
    name: str | None = Field(None, description="Stage name; defaults to the recipe file's stem.")

    @property
    def is_adapter(self) -> bool:
        return self.method.kind in ADAPTER_METHODS

    @property
    def packs(self) -> bool:
        """Whether batches are packed (data.packing resolved for the method)."""
        if self.data.packing == "auto":
            return self.method.kind not in ("prompt", "prefix")
        return self.data.packing == "on"

    def to_toml_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json(exclude_none=True))

    def to_toml(self) -> str:
        """The resolved recipe, every default filled in, as a TOML file ftkit reads back."""
        import tomli_w  # only where a recipe is written

        return tomli_w.dumps(self.to_toml_dict())
