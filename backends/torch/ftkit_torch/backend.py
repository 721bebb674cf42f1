"""The PyTorch backend: transformers models, PEFT methods, torch optimizers.

Only tensor math lives here; the loop, data, schedule and formats are the core's.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ftkit.common import distributed
from ftkit.common.errors import FtkitError
from ftkit.data.batch import Batch, PairBatch
from ftkit.models.logits import final_transforms
from ftkit.recipe.schema import Recipe
from ftkit_torch import parallel, preference
from ftkit_torch import precision as precision_rule
from ftkit_torch.loss import HeadLoss
from ftkit_torch.methods import attach_method, count_parameters
from ftkit_torch.optim import LocalShards, build_optimizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(want: str) -> torch.device:
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise FtkitError("torch.device = 'cuda', but torch sees no CUDA GPU (torch.cuda.is_available() is False).")
    return torch.device(want)


def _refuse_unsupported(recipe: Recipe, model_path: Path, world: distributed.World) -> None:
    """Keys this backend cannot honour are errors, never silently dropped."""
    import json

    mode = recipe.torch.distributed
    if world.size > 1 and mode == "none":
        raise FtkitError(f"{world.size} processes were started, but torch.distributed = 'none': set it to 'ddp' or 'fsdp' "
                         "(--set torch.distributed=fsdp), or start one process with `ftkit train`.")
    if world.size > 1 and mode == "fsdp" and recipe.torch.precision == "fp16":
        raise FtkitError("torch.precision = 'fp16' with torch.distributed = 'fsdp': ftkit's fp16 loss scaling is for one process "
                         "or DDP; use 'bf16' (no loss scaling needed) with FSDP.")
    if world.size > 1 and mode == "fsdp" and recipe.train.optimizer == "adafactor":
        raise FtkitError("train.optimizer = 'adafactor' with torch.distributed = 'fsdp': Adafactor's row and column statistics "
                         "need whole matrices, and FSDP holds shards; use adamw or a bitsandbytes optimizer (adamw_8bit, paged_adamw_8bit).")
    if world.size > 1 and mode == "fsdp" and recipe.method.kind in ("prompt", "prefix"):
        raise FtkitError(f"method.kind = '{recipe.method.kind}' with torch.distributed = 'fsdp': PEFT reads virtual-token "
                         "embeddings outside the sharded forward; use torch.distributed = 'ddp'.")
    cfg_file = model_path / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    if "quantization" in cfg and "quant_method" not in (cfg.get("quantization_config") or {}):
        raise FtkitError(f"{model_path} is quantized in MLX's format (group size {cfg['quantization'].get('group_size')}, "
                         f"{cfg['quantization'].get('bits')} bits), which torch cannot load: use --backend mlx, or train on the unquantized model.")


def _virtual_tokens(model) -> tuple[int, bool]:
    """(soft-prompt positions PEFT prepends to the logits, whether PEFT adds virtual tokens at all).

    A soft prompt is prepended to the input; a prefix lives in the attention cache, so the logits
    keep their length.
    """
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or not config.is_prompt_learning:
        return 0, False
    return (int(config.num_virtual_tokens) if config.peft_type.value != "PREFIX_TUNING" else 0), True


def _logits_selection(model) -> str:
    """Where the output head runs: "targets" (a boolean `logits_to_keep` mask, transformers 5),
    "columns" (positions shared by the rows, older transformers), or "all" (a model class without
    `logits_to_keep`)."""
    import inspect

    import transformers.modeling_utils as mu

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return "all"
    return "targets" if hasattr(mu, "slice_logits_to_keep") else "columns"


def bnb_kind(recipe: Recipe) -> str:
    """model.quantize in bitsandbytes' terms: 4bit/8bit (MLX's spelling) mean nf4/int8 here."""
    return {"4bit": "nf4", "8bit": "int8"}.get(recipe.model.quantize, recipe.model.quantize)


def quantization_label(recipe: Recipe) -> str:
    q = bnb_kind(recipe)
    return q + (", double quantization" if q != "int8" and recipe.torch.double_quant else "")


def quantization_config(recipe: Recipe, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    q = bnb_kind(recipe)
    if q == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # Storage in the compute dtype, not uint8, so that FSDP can flatten and shard the 4-bit weights
    # with the rest (bitsandbytes#1092, peft#2505).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q, bnb_4bit_use_double_quant=recipe.torch.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype)


def _keep_4bit_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for AVX512-BF16 CPUs at the first no-grad forward.

    The repacked layout keeps absmax in bf16 (validation losses move by ~1e-3) and, once packed, every
    later forward takes an inference kernel with no autograd, so training after a validation silently
    loses those layers' input gradients; under FSDP the repacking also fights the all-gathered shards.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        self.model = None
        self.optimizer = None
        self.reference: preference.Reference | None = None  # DPO's (set_reference)

    # ------------------------------------------------------------------ loading
    def load(self, recipe: Recipe, model_path: Path, *, adapter: Path | None, train: bool) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        # ftkit draws its own progress; transformers' per-load bars and notices would bury it.
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

        self.recipe = recipe
        cfg = recipe.torch
        self.world = distributed.current()
        _refuse_unsupported(recipe, model_path, self.world)
        self.device = pick_device(cfg.device)
        self.sharded = self.world.size > 1 and cfg.distributed == "fsdp"
        if self.world.size > 1:
            self.device = parallel.join(self.world, self.device.type)
        cuda = self.device.type == "cuda"
        self.precision_choice = precision_rule.resolve(
            cfg.precision, self.device.type, train=train, cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
            flags=precision_rule.cpu_flags() if self.device.type == "cpu" else frozenset())
        precision = self.precision = self.precision_choice.name
        self.autocast_dtype = _PRECISIONS.get(precision)
        if recipe.model.dtype != "auto":
            dtype = _DTYPES[recipe.model.dtype]
        else:
            # Frozen base weights can live in the compute dtype; trained weights stay fp32 (master copy).
            dtype = self.autocast_dtype if (self.autocast_dtype and recipe.method.kind != "full") else torch.float32
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": recipe.model.trust_remote_code}
        if cfg.attn_implementation != "auto":
            kwargs["attn_implementation"] = cfg.attn_implementation
        quantized = recipe.model.quantize != "none"
        if quantized:
            kwargs["quantization_config"] = quantization_config(recipe, self.autocast_dtype or torch.float32)
            kwargs["device_map"] = {"": str(self.device)}  # bitsandbytes quantizes as the weights reach the device
        torch.manual_seed(recipe.train.seed)
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        model.config.use_cache = False
        if quantized:
            _keep_4bit_layout(model)
        if quantized and train:
            from peft import prepare_model_for_kbit_training

            # norms and other small weights in fp32, input gradients on: PEFT's recipe for QLoRA
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        model = attach_method(model, recipe.method, adapter=adapter, train=train)
        self.n_virtual, self.prompt_learning = _virtual_tokens(model)
        self.logits_at = "all" if self.prompt_learning else _logits_selection(model)
        if train and cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        self.model = model if quantized else model.to(self.device)
        self.model.train(train)
        self.train_model = self.model
        self.head_loss = None
        if train and self.logits_at == "targets" and not cfg.compile and not final_transforms(self.model.config.to_dict()):
            self.head_loss = HeadLoss(self.model, self.model.config.get_text_config().vocab_size)
            self._check_head_loss()
        # fp16 has too few exponent bits for small gradients; bf16 and fp32 need no scaling.
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" and train else None

    @torch.no_grad()
    def _check_head_loss(self) -> None:
        """The loss inside the output head must equal plain logits' on a probe batch (ftkit_torch.loss)."""
        vocab = self.head_loss.vocab
        ids = np.arange(17, dtype=np.int32)[None] * 7919 % vocab
        probe = Batch(ids[:, :-1], ids[:, 1:], np.ones((1, 16), np.float32), np.ones((1, 16), np.int32))
        was = self.model.training
        self.model.eval()  # no dropout: both paths must see the same network
        try:
            head, self.head_loss = self.head_loss, None
            plain = self._loss_sum(probe, self.model)
            self.head_loss = head
            wanted = self._tensor(probe.targets[0], torch.long)
            inside = head(lambda: self.model(input_ids=self._tensor(probe.inputs, torch.long),
                                             logits_to_keep=self._tensor(probe.mask > 0, torch.bool)), wanted)
            head.verify(plain, inside)
        finally:
            self.model.train(was)

    def start_training(self) -> None:
        cfg = self.recipe.torch
        if self.world.size > 1:
            torch.manual_seed(self.recipe.train.seed + self.world.rank)  # each process its own dropout masks
            self.train_model = parallel.wrap(self.model, cfg.distributed, self.device)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        # After sharding: FSDP's optimizer must hold the sharded parameters.
        self.optimizer = build_optimizer(self.model, self.recipe.train, self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def switches(self) -> dict[str, str]:
        """What the run log says was on: the memory and speed switches, as they took effect."""
        cfg = self.recipe.torch
        attn = getattr(self.model.config, "_attn_implementation", None) or cfg.attn_implementation
        out = {
            # with auto, what it chose and why: the banner's "switches" line and the report show it
            "precision": self.precision + (" autocast" if self.autocast_dtype else "")
                         + (f" ({self.precision_choice.reason})" if self.precision_choice.reason else ""),
            "loss scaling": "on" if self.scaler is not None else "off",
            "gradient checkpointing": "on" if cfg.gradient_checkpointing else "off",
            "torch.compile": "on" if cfg.compile else "off",
            "attention": str(attn),
            "optimizer": self.recipe.train.optimizer,
            "distributed": (f"{cfg.distributed} x{self.world.size}" if self.world.size > 1 else
                            "none" if cfg.distributed == "none" else f"{cfg.distributed} asked, 1 process: not wrapped"),
        }
        if self.recipe.model.quantize != "none":
            out["quantization"] = quantization_label(self.recipe)
        return out

    def describe(self) -> dict[str, Any]:
        trainable, total = count_parameters(self.model)
        return {
            "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "precision": self.precision,  # the bare name: ftkit.backend.peak reads the compute dtype from it
            **({"precision_choice": self.precision_choice.reason} if self.precision_choice.reason else {}),
            "trainable_params": trainable,
            "total_params": total,
            "gradient_checkpointing": self.recipe.torch.gradient_checkpointing,
            "torch": torch.__version__,
            "switches": self.switches(),
            **({"quantization": f"{quantization_label(self.recipe)} (bitsandbytes)"} if self.recipe.model.quantize != "none" else {}),
            **({"reference": self.reference.label, "reference_bytes": self.reference.nbytes} if self.reference else {}),
        }

    # ------------------------------------------------------------------ math
    def _tensor(self, a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype, non_blocking=True)

    def _model_inputs(self, batch: Batch) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"input_ids": self._tensor(batch.inputs, torch.long)}
        if batch.positions is not None:
            # No attention mask: transformers then reads the packed examples from the position ids
            # and keeps attention inside each (block-diagonal causal mask, or varlen flash attention).
            kwargs["position_ids"] = self._tensor(batch.positions, torch.long)
        else:
            kwargs["attention_mask"] = self._tensor(batch.attention_mask, torch.long)
        return kwargs

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _loss_sum(self, batch: Batch, model) -> torch.Tensor:
        kwargs = self._model_inputs(batch)
        targets, mask = batch.targets, batch.mask
        autocast = self._autocast()
        if self.logits_at == "targets":
            # The output head only at target positions (ftkit_torch.loss): the masks are 0/1, so the
            # loss is the plain sum over the selected tokens.
            selected = mask > 0
            kwargs["logits_to_keep"] = self._tensor(selected, torch.bool)
            wanted = self._tensor(targets[selected], torch.long)
            with autocast:
                if self.head_loss is not None and self.head_loss.wanted(len(wanted)):
                    return self.head_loss(lambda: model(**kwargs), wanted)
                logits = model(**kwargs).logits
            return F.cross_entropy(logits.float(), wanted, reduction="sum")
        keep = np.flatnonzero(mask.any(axis=0))
        if self.logits_at == "columns" and len(keep) < mask.shape[1]:
            # Older transformers: positions shared by the rows, where some row has a target.
            kwargs["logits_to_keep"] = self._tensor(keep, torch.long)
            targets, mask = targets[:, keep], mask[:, keep]
        with autocast:
            logits = model(**kwargs).logits[:, self.n_virtual :]
        losses = F.cross_entropy(logits.float().flatten(0, 1), self._tensor(targets, torch.long).flatten(), reduction="none")
        return (losses * self._tensor(mask, torch.float32).flatten()).sum()

    def forward_backward(self, batch: Batch, scale: float, sync: bool = True) -> torch.Tensor:
        with self._gradient_sync(sync):
            loss = self._loss_sum(batch, self.train_model)
            # `scale` is 1 / the step's target tokens over all processes; DDP and FSDP average the
            # processes' gradients, so each process's sum is scaled up by their number first.
            scaled = loss * (scale * self.world.size)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach()  # read by the core at the next report: no host sync per micro-batch

    # DPO / ORPO: ftkit_torch.preference
    def set_reference(self, adapter: Path | None) -> None:
        self.reference = preference.build_reference(self, adapter)

    def pair_forward_backward(self, batch: PairBatch, scale: float, sync: bool = True) -> dict[str, Any]:
        return preference.pair_forward_backward(self, batch, scale, sync)

    def sequence_logps(self, batch: PairBatch, reference: bool = False) -> np.ndarray:
        return preference.sequence_logps(self, batch, reference)

    def _gradient_sync(self, sync: bool):
        """Reduce gradients across processes only after a step's last micro-batch."""
        import contextlib

        if self.world.size == 1 or sync:
            if self.sharded:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.sharded:
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def optimizer_step(self, lr: float, skip_nonfinite: bool = False) -> dict[str, Any]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        max_norm = self.recipe.train.max_grad_norm
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm if max_norm else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a sharded norm
        stats: dict[str, Any] = {"grad_norm": norm.detach()}  # tensors: the core reads them at reports only
        if skip_nonfinite:  # the norm is the same on every process (DDP reduced the gradients; FSDP's is full)
            stats["skipped"] = not bool(torch.isfinite(norm).item())
        if self.scaler:
            stats["loss_scale"] = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        elif not stats.get("skipped"):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            stats["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return stats

    def reduce_sum(self, values: list[float]) -> list[float]:
        return parallel.reduce_sum(values, self.device) if self.world.size > 1 else list(values)

    @torch.no_grad()
    def trainable_finite(self) -> bool:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.trainable]  # FSDP: this process's shard
        ok = bool(torch.stack([torch.isfinite(p).all() for p in local]).all().item()) if local else True
        return self.reduce_sum([0.0 if ok else 1.0])[0] == 0 if self.world.size > 1 else ok

    def barrier(self) -> None:
        if self.world.size > 1:
            parallel.barrier()

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            return self._loss_sum(batch, self.model).item()
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def row_losses(self, batch: Batch) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            kwargs = self._model_inputs(batch)
            autocast = self._autocast()
            if self.logits_at == "targets":
                selected = batch.mask > 0  # logits only where a row has a target: a label's few tokens
                kwargs["logits_to_keep"] = self._tensor(selected, torch.bool)
                with autocast:
                    logits = self.model(**kwargs).logits
                per = F.cross_entropy(logits.float(), self._tensor(batch.targets[selected], torch.long), reduction="none")
                rows = np.nonzero(selected)[0]
                return np.bincount(rows, weights=per.cpu().double().numpy() * batch.mask[selected], minlength=len(batch.inputs))
            with autocast:
                logits = self.model(**kwargs).logits[:, self.n_virtual :]
            per = F.cross_entropy(logits.float().transpose(1, 2), self._tensor(batch.targets, torch.long), reduction="none")
            return (per * self._tensor(batch.mask, torch.float32)).sum(1).cpu().double().numpy()
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def next_logits(self, new_ids: list[int], state: Any | None) -> tuple[np.ndarray, Any]:
        self.model.eval()
        ids = torch.tensor([new_ids], device=self.device)
        # A soft prompt or prefix is added once; later tokens extend its cache through the base model.
        model = self.model.base_model if (self.prompt_learning and state is not None) else self.model
        with self._autocast():
            out = model(input_ids=ids, past_key_values=state, use_cache=True)
        return out.logits[0, -1].float().cpu().numpy(), out.past_key_values

    # ------------------------------------------------------------------ adapter tensors
    def _peft(self):
        model = self.model
        if not hasattr(model, "peft_config"):
            raise FtkitError("this model carries no adapter (method.kind = 'full').")
        return model

    def adapter_tensors(self) -> dict[str, np.ndarray]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().float().cpu().numpy() for k, v in get_peft_model_state_dict(self._peft()).items()}

    def set_adapter_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        model = self._peft()
        dtypes = {k: v.dtype for k, v in get_peft_model_state_dict(model).items()}
        unknown = sorted(set(tensors) - set(dtypes))
        if unknown:
            raise FtkitError(f"adapter tensors the model does not hold: {unknown[:3]}")
        state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, dtypes[k]) for k, v in tensors.items()}
        set_peft_model_state_dict(model, state)

    @torch.no_grad()
    def embedding_rows(self, ids: list[int]) -> np.ndarray:
        emb = self.model.get_input_embeddings()
        return emb(torch.tensor(ids, device=self.device)).float().cpu().numpy()

    # ------------------------------------------------------------------ saving
    def save_adapter(self, dest: Path) -> None:
        """Every process calls this; under FSDP the shards are gathered, and the first process writes."""
        state = parallel.gathered_state_dict(self.model, trainable_only=self.recipe.is_adapter) if self.sharded else None
        if self.world.is_main:
            # the trained adapter only: a DPO reference adapter loaded beside it is not part of the result
            only = {"selected_adapters": ["default"]} if hasattr(self.model, "peft_config") else {}
            self.model.save_pretrained(dest, state_dict=state, safe_serialization=True, **only)

    def fuse(self, dest: Path, dequantize: bool) -> None:
        model = self._peft()
        if self.prompt_learning:
            raise FtkitError("a soft prompt cannot be merged into the weights; use the adapter with --adapter instead.")
        merged = model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(dest, safe_serialization=True)

    # One process: torch_state.pt holds everything. Several: the optimizer state goes through
    # torch.distributed.checkpoint (each process its shard, readable by another process count) and
    # each process keeps its own RNG state.
    def save_state(self, dest: Path) -> None:
        state: dict[str, Any] = {"cpu_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        if self.world.size == 1:
            torch.save({"optimizer": self.optimizer.state_dict(), **state}, dest / "torch_state.pt")
            return
        if isinstance(self.optimizer, LocalShards):
            state["optimizer"] = self.optimizer.state_dict()  # this process's shards
        else:
            parallel.save_optimizer(self.model, self.optimizer, dest / "optimizer")
        torch.save(state, dest / f"rank{self.world.rank}.pt")

    def load_state(self, src: Path) -> None:
        # The core has checked that this run has as many processes as the one that saved the state.
        if self.world.size == 1:
            state = torch.load(src / "torch_state.pt", map_location=self.device, weights_only=False)
            self.optimizer.load_state_dict(state.pop("optimizer"))
        else:
            state = torch.load(src / f"rank{self.world.rank}.pt", map_location="cpu", weights_only=False)
            if isinstance(self.optimizer, LocalShards):
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                parallel.load_optimizer(self.model, self.optimizer, src / "optimizer")
        torch.set_rng_state(state["cpu_rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def quantize_folder(self, src: Path, dest: Path, bits: int, group_size: int) -> None:
        # bitsandbytes quantizes as the model loads; there is no quantized folder format to write
        raise FtkitError(
            f"{src}: the torch backend writes no quantized model folder; it quantizes at load time: set "
            'model.quantize = "nf4", "fp4" or "int8" in the recipe and keep the folder as it is. '
            "`ftkit convert --quantize` writes MLX's quantized format and needs the MLX backend."
        )

    def gemm_flops(self, shapes: list[tuple[int, int, int]], dtype: str, seconds: float) -> float:
        from ftkit_torch.gemm import best_flops

        return best_flops(shapes, dtype, getattr(self, "device", None) or pick_device("auto"), seconds)  # loaded: its device
