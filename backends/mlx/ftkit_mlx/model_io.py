"""Model folders in and out of MLX: loading through mlx-lm, writing Hugging Face folders, quantizing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ftkit.common.errors import FtkitError
from ftkit.models import mlx_config
from ftkit_mlx import patches

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")


def model_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The keys mlx-lm reads, as it reads them (ftkit.models.mlx_config: transformers 5 nests or renames
    them); loading also installs the plan's patches."""
    return mlx_config.plan(config).overrides


def load_base(model_path: Path, trust_remote_code: bool = False,
              max_seq_length: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model as transformers computes it, or an FtkitError saying why not, before any weight is
    read. The config returned is config.json's (plus mlx-lm's quantization entry), not the translation:
    a folder saved from it stays as transformers reads it."""
    from mlx_lm.utils import load_config, load_model

    config = load_config(model_path)
    plan = mlx_config.plan(config)
    if max_seq_length is not None:
        mlx_config.check_context(plan, max_seq_length)
    try:
        model, loaded = load_model(model_path, model_config=plan.overrides, trust_remote_code=trust_remote_code)
    except (ValueError, FileNotFoundError) as e:
        raise FtkitError(f"{model_path}: mlx-lm cannot load this model ({e}).") from None
    patches.apply(model, plan)
    patches.exact_embedding_scale(model, config)
    for key in plan.overrides:
        if key in config:
            loaded[key] = config[key]
        else:
            loaded.pop(key, None)
    return model, loaded


def save_model_folder(dest: Path, weights: dict[str, mx.array], config: dict[str, Any], source: Path) -> None:
    """A Hugging Face model folder: mlx-lm's Llama-family parameter names are the transformers ones, and
    a mixture-of-experts block's stacked experts are written one tensor per expert, as `save_pretrained`
    writes them (transformers reads no other layout; mlx-lm reads both).

    A quantized model keeps MLX's `quantization` entry (group size, bits), which mlx-lm reads back, and
    its experts stacked: transformers cannot read it anyway, and mlx-lm stacks only plain weights back.
    """
    from mlx_lm.utils import make_shards

    from ftkit_mlx.experts import hf_expert_weights

    if "quantization" not in config:
        weights = hf_expert_weights(weights, config.get("model_type"))
    dest.mkdir(parents=True, exist_ok=True)
    shards = make_shards(weights)
    index: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(dest / name), shard, metadata={"format": "pt"})
        index.update({k: name for k in shard})
    if len(shards) > 1:
        total = sum(v.nbytes for v in weights.values())
        (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "quantization_config")}
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if (source / "generation_config.json").exists():
        shutil.copy(source / "generation_config.json", dest)


def quantize_folder(src: Path, dest: Path, bits: int, group_size: int) -> dict[str, Any]:
    """Write `src` quantized in MLX's format (affine, `bits` per weight, one scale per `group_size`)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model

    model, config = load_base(src)
    if "quantization" in config:
        raise FtkitError(f"{src} is already quantized ({config['quantization']}).")
    model, config = quantize_model(model, config, group_size, bits)
    save_model_folder(dest, dict(tree_flatten(model.parameters())), config, src)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
    return config["quantization"]
