"""The MLX backend: mlx-lm's model zoo, loaders, LoRA/DoRA layers and quantization.

Only tensor math lives here; the loop, data, schedule, initial values and formats are the core's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ftkit.adapters import layout as adapter_layout
from ftkit.adapters import targets
from ftkit.common import distributed
from ftkit.common.errors import FtkitError
from ftkit.data.batch import Batch, PairBatch
from ftkit.models.logits import final_transforms
from ftkit.recipe.schema import Recipe
from ftkit_mlx import methods, model_io
from ftkit_mlx import optim as mlx_optim
from ftkit_mlx import preference as mlx_preference
from ftkit_mlx import step as mlx_step

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_BITS = {"4bit": 4, "8bit": 8}


def _count_parameters(module: nn.Module) -> int:
    """All parameters, a quantized weight counted as the values it stands for (not its packed words)."""
    total = sum(v.size for _, v in tree_flatten(module.parameters()))
    for _, m in module.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += m.weight.size * 32 // m.bits - m.weight.size - m.scales.size - (m.biases.size if m.biases is not None else 0)
    return int(total)


class MlxBackend:
    name = "mlx"

    def __init__(self) -> None:
        self.tuned: methods.Tuned | None = None
        self.optimizer = None
        self.step: mlx_step.Step | None = None
        self.reference: mlx_preference.Reference | None = None  # DPO's (set_reference)

    # ------------------------------------------------------------------ loading
    def load(self, recipe: Recipe, model_path: Path, *, adapter: Path | None, train: bool) -> None:
        self.recipe, self.model_path, self.kind = recipe, Path(model_path), recipe.method.kind
        self._refuse_unsupported(recipe)
        if self.kind == "prompt":
            methods.check_prompt_family(self.model_path)
        mx.random.seed(recipe.train.seed)
        model, self.config = model_io.load_base(self.model_path, recipe.model.trust_remote_code, recipe.data.max_seq_length)
        if recipe.model.dtype != "auto":
            model.set_dtype(_DTYPES[recipe.model.dtype])
        elif not mx.metal.is_available():
            model.set_dtype(mx.float32)  # CPUs have no fast half precision; Apple GPUs keep the stored dtype
        if recipe.model.quantize != "none":
            from mlx_lm.utils import quantize_model

            if "quantization" in self.config:
                raise FtkitError(f"model.quantize = '{recipe.model.quantize}', but {model_path} is already quantized; set model.quantize = 'none'.")
            model, self.config = quantize_model(model, self.config, recipe.mlx.quantize_group_size, _BITS[recipe.model.quantize])
        model.freeze()
        self.tuned = methods.Tuned(model)
        self.num_layers = len(model.layers)
        self.hidden = int(self.config.get("hidden_size") or methods.embed_tokens(model).weight.shape[-1])
        self.scale, self.dropout = recipe.method.alpha / recipe.method.rank, recipe.method.dropout
        if adapter is not None:
            self._load_adapter(Path(adapter), train)
        elif self.kind == "full":
            if train:
                model.unfreeze()
        elif not train:
            raise FtkitError("no adapter given: pass --adapter DIR (or evaluate the base with method.kind = 'full').")
        elif self.kind == "prompt":
            self.tuned.add_prompt(mx.zeros((recipe.method.num_virtual_tokens, self.hidden)))
        else:
            modules = targets.select(list(methods.linear_shapes(model)), recipe.method, self.num_layers)
            methods.attach_lora(model, modules, {m: recipe.method.rank for m in modules}, self.scale, self.dropout, self.kind == "dora")
        if train and recipe.mlx.gradient_checkpointing:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        self.tuned.train(train)
        self.head = None
        if train:
            self.optimizer = mlx_optim.build(recipe.train)
            self.step = mlx_step.Step(self.tuned, self.optimizer, recipe.train, compiled=mlx_step.wanted(recipe.mlx.compile),
                                      max_length=recipe.data.max_seq_length)
            self._reseed()
        mx.eval(self.tuned.parameters())
        if train:
            self._check_head()

    def _refuse_unsupported(self, recipe: Recipe) -> None:
        """Keys this backend cannot honour are errors, never silently dropped."""
        q = recipe.model.quantize
        if q not in ("none", *_BITS):
            raise FtkitError(f"model.quantize = '{q}' is a bitsandbytes format (torch on CUDA); on the MLX backend use '4bit' or '8bit'.")
        if recipe.method.kind == "prefix":
            raise FtkitError("method.kind = 'prefix' is not available on the MLX backend; use 'prompt' (soft prompt tuning) or 'lora'.")
        if recipe.train.optimizer in mlx_optim.CUDA_ONLY:
            mlx_optim.build(recipe.train)  # raises with the reason
        world = distributed.current()
        if world.size > 1:
            raise FtkitError(f"the MLX backend trains in one process, but {world.size} were started: "
                             "run `ftkit train` (not `ftkit launch` or torchrun) on a Mac.")

    def _load_adapter(self, adapter: Path, train: bool) -> None:
        model = self.tuned.model
        config, weights = adapter_layout.open_for(adapter, methods.linear_shapes(model), self.hidden,
                                                  method=self.recipe.method if train else None, num_layers=self.num_layers)
        if weights is None:
            raise FtkitError(f"{adapter} is a prefix-tuning adapter; the MLX backend has no prefix tuning (use --backend torch).")
        self.kind = kind = adapter_layout.adapter_kind(config)
        if isinstance(weights, adapter_layout.PromptAdapter):
            self.tuned.add_prompt(mx.array(weights.embeddings))
            return
        self.scale, self.dropout = weights.scale, weights.dropout
        ranks = {m: weights.rank(m) for m in weights.modules}
        methods.attach_lora(model, weights.modules, ranks, weights.scale, weights.dropout, kind == "dora")
        methods.from_common(self.tuned, kind, adapter_layout.lora_tensors(weights))

    def describe(self) -> dict[str, Any]:
        trainable = sum(v.size for _, v in tree_flatten(self.tuned.trainable_parameters()))
        device = mx.default_device()
        dtype = next(v.dtype for _, v in tree_flatten(self.tuned.model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
        info = {
            "device": f"mlx {'gpu (Metal)' if device.type == mx.DeviceType.gpu else 'cpu'}",
            "dtype": str(dtype).replace("mlx.core.", ""),
            "precision": str(dtype).replace("mlx.core.", ""),
            "trainable_params": int(trainable),
            "total_params": _count_parameters(self.tuned),
            "gradient_checkpointing": self.recipe.mlx.gradient_checkpointing,
            "compiled_step": self.step is not None and self.step.compiled,
            "mlx": mx.__version__,
        }
        if self.reference is not None:
            info["reference"] = self.reference.description
        if "quantization" in self.config:
            q = self.config["quantization"]
            info["quantization"] = f"{q.get('bits')}-bit, group size {q.get('group_size')}"
        return info

    # ------------------------------------------------------------------ math
    def _loss_sum(self, tuned: methods.Tuned, inputs: mx.array, targets_: mx.array, mask: mx.array, attention=None,
                  selected: mx.array | None = None, weights: mx.array | None = None) -> mx.array:
        """The sum of target-token losses of one micro-batch (`mlx_step.Arrays`)."""
        return self._token_losses(tuned, inputs, targets_, mask, attention, selected, weights).sum()

    def _token_losses(self, tuned: methods.Tuned, inputs: mx.array, targets_: mx.array, mask: mx.array, attention=None,
                      selected: mx.array | None = None, weights: mx.array | None = None) -> mx.array:
        """Each target token's loss, 0 elsewhere: [len(selected)] at the selected positions, else [B, T]
        (the preference objectives sum them per sequence)."""
        packed = None if attention is None else [methods.PackedAttention(attention)] * self.num_layers  # it holds no state
        if selected is not None:
            # The output head only at target positions (the masks are 0/1): no logits for prompt tokens.
            hidden = tuned.hidden_states(inputs, cache=packed)
            hidden = mx.take(hidden.reshape(-1, hidden.shape[-1]), selected, axis=0)
            logits = self.head(hidden).astype(mx.float32)
            losses = nn.losses.cross_entropy(logits, mx.take(targets_.reshape(-1), selected), reduction="none")
            return losses if weights is None else losses * weights  # weights: 0 on bucket padding
        logits = tuned(inputs, cache=packed).astype(mx.float32)
        return nn.losses.cross_entropy(logits, targets_, reduction="none") * mask

    def _check_head(self) -> None:
        """Use the head-only-at-targets path only where it gives the model's own logits (a model whose
        forward post-processes logits, or has no `model.model` decoder, keeps full logits)."""
        self.head = None if final_transforms(self.config) else methods.output_head(self.tuned)
        if self.head is None:
            return
        probe = mx.array((np.arange(16, dtype=np.int32) * 7919 % self.config.get("vocab_size", 256))[None])
        try:
            ok = mx.allclose(self.head(self.tuned.hidden_states(probe)), self.tuned(probe), atol=1e-4).item()
        except (AttributeError, TypeError, ValueError):
            ok = False
        if not ok:
            self.head = None

    def forward_backward(self, batch: Batch, scale: float, sync: bool = True) -> mx.array:
        arrays, padding = self.step.arrays(batch, self.head is not None)
        return self.step.backward(self._loss_sum, arrays, scale, padding)

    @property
    def grads(self):
        """The gradients accumulated so far in this step (None before the first micro-batch)."""
        return self.step.grads

    def start_training(self) -> None:
        """Nothing to wrap: one process, and the optimizer is made at load."""

    def reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def barrier(self) -> None:
        pass

    def optimizer_step(self, lr: float, skip_nonfinite: bool = False) -> dict[str, Any]:
        norm, skipped = self.step.update(lr, skip_nonfinite)
        # Skipped: the optimizer's step count stays, so reseeding from it, the next step draws this one's
        # dropout masks again, as a run resumed from a checkpoint here does (exact resume).
        self._reseed()
        return {"grad_norm": norm, **({"skipped": skipped} if skip_nonfinite else {})}

    def trainable_finite(self) -> bool:
        leaves = [v for _, v in tree_flatten(self.tuned.trainable_parameters())]
        return bool(mx.all(mx.stack([mx.isfinite(v).all() for v in leaves])).item()) if leaves else True

    def _reseed(self) -> None:
        """Dropout's randomness for the next step, as a function of (seed, step).

        MLX's global generator state cannot be written back, so instead of saving it, a resumed run
        reseeds from the step it resumes at and draws exactly what the uninterrupted run drew.
        """
        step = int(self.optimizer.state["step"].item()) if "step" in self.optimizer.state else 0
        mx.random.seed(int(np.random.SeedSequence([self.recipe.train.seed, step]).generate_state(1)[0]))

    def eval_loss(self, batch: Batch) -> float:
        was_training = self.tuned.training
        self.tuned.train(False)
        try:
            loss = self._loss_sum(self.tuned, *mlx_step.batch_arrays(batch, self.head is not None)[0])  # the target-position head too
            mx.eval(loss)
            return loss.item()
        finally:
            self.tuned.train(was_training)

    def row_losses(self, batch: Batch) -> np.ndarray:
        was_training = self.tuned.training
        self.tuned.train(False)
        try:
            inputs, targets_, mask = mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)
            per = nn.losses.cross_entropy(self.tuned(inputs).astype(mx.float32), targets_, reduction="none")
            out = (per * mask).sum(axis=1)
            mx.eval(out)
            return np.array(out).astype(np.float64)
        finally:
            self.tuned.train(was_training)

    def next_logits(self, new_ids: list[int], state: Any | None) -> tuple[np.ndarray, Any]:
        from mlx_lm.models.cache import make_prompt_cache

        self.tuned.train(False)
        cache = state if state is not None else make_prompt_cache(self.tuned.model)
        logits = self.tuned(mx.array([new_ids]), cache=cache)[0, -1].astype(mx.float32)
        return np.array(logits), cache

    # ------------------------------------------------------------------ preference objectives (ftkit_mlx.preference)
    def set_reference(self, adapter: Path | None) -> None:
        self.reference = mlx_preference.make_reference(self, None if adapter is None else Path(adapter))

    def pair_forward_backward(self, batch: PairBatch, scale: float, sync: bool = True) -> dict[str, Any]:
        return mlx_preference.pair_forward_backward(self, batch, scale)

    def sequence_logps(self, batch: PairBatch, reference: bool = False) -> np.ndarray:
        return mlx_preference.sequence_logps(self, batch, reference)

    # ------------------------------------------------------------------ adapter tensors
    def adapter_tensors(self) -> dict[str, np.ndarray]:
        if self.kind == "full":
            raise FtkitError("this model carries no adapter (method.kind = 'full').")
        return methods.to_common(self.tuned, self.kind, self.scale, self.dropout)

    def set_adapter_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        methods.from_common(self.tuned, self.kind, tensors)
        mx.eval(self.tuned.parameters())

    def embedding_rows(self, ids: list[int]) -> np.ndarray:
        return np.array(self.tuned.embedding_rows(mx.array(ids)).astype(mx.float32))  # in PEFT's space (Gemma: scaled)

    # ------------------------------------------------------------------ saving
    def save_adapter(self, dest: Path) -> None:
        if self.kind == "full":
            model_io.save_model_folder(dest, dict(tree_flatten(self.tuned.model.parameters())), dict(self.config), self.model_path)
            return
        base = self.recipe.model.path
        if self.kind == "prompt":
            cfg = adapter_layout.prompt_config(self.tuned.n_virtual, self.hidden, self.num_layers,
                                               int(self.config.get("num_attention_heads", 0)), base)
            adapter = adapter_layout.PromptAdapter(np.array(self.tuned.prompt_embeddings.astype(mx.float32)))
        else:
            adapter = methods.lora_adapter(self.tuned, self.kind, self.scale, self.dropout)
            rank = adapter.rank(adapter.modules[0])
            cfg = adapter_layout.lora_config(self.kind, rank, self.scale * rank, self.dropout, adapter.modules, base, self.num_layers)
        adapter_layout.write_adapter(dest, cfg, adapter)

    def fuse(self, dest: Path, dequantize: bool) -> None:
        from mlx_lm.utils import dequantize_model

        if self.kind == "prompt":
            raise FtkitError("a soft prompt cannot be merged into the weights; use the adapter with --adapter instead.")
        if self.kind == "full":
            raise FtkitError("this model carries no adapter (method.kind = 'full'): it is already a plain model folder.")
        model = self.tuned.model
        methods.fuse_lora(model, dequantize)
        config = dict(self.config)
        if dequantize and "quantization" in config:
            model = dequantize_model(model)
            config.pop("quantization", None)
            config.pop("quantization_config", None)
        model_io.save_model_folder(dest, dict(tree_flatten(model.parameters())), config, self.model_path)

    def save_state(self, dest: Path) -> None:
        state = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(str(dest / "mlx_optimizer.safetensors"), state)

    def load_state(self, src: Path) -> None:
        state = mx.load(str(src / "mlx_optimizer.safetensors"))
        self.optimizer.init(self.tuned.trainable_parameters())
        self.optimizer.state = tree_unflatten(list(state.items()))
        self._reseed()

    def quantize_folder(self, src: Path, dest: Path, bits: int, group_size: int) -> None:
        model_io.quantize_folder(src, dest, bits, group_size)

    def gemm_flops(self, shapes: list[tuple[int, int, int]], dtype: str, seconds: float) -> float:
        from ftkit_mlx.gemm import best_flops

        return best_flops(shapes, dtype, seconds)
