"""Attach a recipe's method to a transformers model, through PEFT where it is an adapter."""

from __future__ import annotations

from pathlib import Path

from ftkit.errors import FtkitError
from ftkit.recipe import MethodSection


def _num_layers(model) -> int:
    n = getattr(model.config, "num_hidden_layers", None)
    if n is None:
        raise FtkitError("method.layers needs config.num_hidden_layers, which this model's config lacks.")
    return n


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers inside the decoder blocks: PEFT's "all-linear", spelled out,
    because PEFT accepts `layers_to_transform` only with a list of names."""
    import torch

    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{full}":
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def peft_config(model, method: MethodSection):
    from peft import LoraConfig, TaskType

    if method.kind not in ("lora", "dora"):
        raise FtkitError(f"method.kind = {method.kind!r} is not available on the torch backend yet (lora, dora, full are).")
    layers, targets = None, method.targets
    if method.layers is not None:
        n = _num_layers(model)
        layers = list(range(max(0, n - method.layers), n))
        if targets == "all-linear":
            targets = linear_module_names(model)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=method.rank,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        use_dora=method.kind == "dora",
    )


def attach_method(model, method: MethodSection, *, adapter: Path | None, train: bool):
    if method.kind == "full":
        model.requires_grad_(train)
        return model
    from peft import PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=train)
    if not train:
        raise FtkitError("no adapter given: pass --adapter DIR (or evaluate the base with method.kind = 'full').")
    try:
        return get_peft_model(model, peft_config(model, method))
    except ValueError as e:
        raise FtkitError(f"method.targets = {method.targets!r}: {e}") from None


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
