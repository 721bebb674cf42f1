"""Attach a recipe's method to a transformers model, through PEFT where it is an adapter."""

from __future__ import annotations

from pathlib import Path

from ftkit.adapters import layout as adapter_layout
from ftkit.adapters import targets
from ftkit.common.errors import AdapterMismatchError, FtkitError
from ftkit.recipe.schema import MethodSection
from ftkit_torch.experts import expert_shapes


def num_layers(model) -> int:
    n = getattr(model.config, "num_hidden_layers", None)
    if n is None:
        raise FtkitError("this model's config has no num_hidden_layers; ftkit cannot tell its decoder blocks apart.")
    return n


def linear_shapes(model) -> dict[str, tuple[int, ...]]:
    """(out, in) of every linear layer, and (experts, out, in) of every MoE block's expert parameters."""
    import torch

    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return {**shapes, **expert_shapes(model)}


def peft_config(model, method: MethodSection):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    if method.kind == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.num_virtual_tokens)
    if method.kind == "prompt":
        cfg = model.config
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.num_virtual_tokens, token_dim=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        )
    n = num_layers(model)
    spec = adapter_layout.peft_targets(targets.select(list(linear_shapes(model)), method, n), n)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=method.rank, lora_alpha=method.alpha, lora_dropout=method.dropout,
        use_dora=method.kind == "dora", **spec,
    )


def attach_method(model, method: MethodSection, *, adapter: Path | None, train: bool):
    if method.kind == "full":
        model.requires_grad_(train)
        return model
    from peft import PeftModel, get_peft_model

    if adapter is not None:
        adapter_layout.open_for(adapter, linear_shapes(model), model.config.hidden_size,
                                method=method if train else None, num_layers=num_layers(model))
        try:
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=train)
        except (RuntimeError, ValueError, KeyError) as e:
            raise AdapterMismatchError(f"{adapter} does not fit this base model: {str(e).splitlines()[0][:400]}") from None
    if not train:
        raise FtkitError("no adapter given: pass --adapter DIR (or evaluate the base with method.kind = 'full').")
    return get_peft_model(model, peft_config(model, method))


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
