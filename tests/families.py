"""Tiny models of every family that both transformers and mlx-lm implement, built from a config with
random weights (2 layers, hidden 64) and the family's own quirks kept: sliding windows, soft-capping,
embedding scaling, fused projections, mixtures of experts.

`build_family(name, dest, tokenizer_dir)` saves an HF folder (config, safetensors, the shared test
tokenizer). `sharpen` scales the query/key weights up, because random init makes attention nearly
uniform, which hides RoPE and mask errors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16, tie_word_embeddings=True),  # mlx-lm's Gemma always ties, as the real ones do
    "gemma2": dict(head_dim=16, tie_word_embeddings=True, sliding_window=32, query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=16, sliding_window_pattern=2),
    "phi3": {},
    "olmo2": {},
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=2.0),
    "smollm3": {},
    "olmo3": dict(sliding_window=32),
    "cohere": dict(logit_scale=0.5, tie_word_embeddings=True),
    "starcoder2": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(head_dim=16, num_experts=4, decoder_sparse_step=1, mlp_only_layers=[], **MOE),
    "qwen2_moe": dict(num_experts=4, decoder_sparse_step=1, shared_expert_intermediate_size=32, mlp_only_layers=[], **MOE),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe")


def build_family(name: str, dest: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised tiny `name` model with the test tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = {**BASE, **FAMILIES[name], **overrides}
    config = AutoConfig.for_model(name, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, dest / f.name)
    return dest


def sharpen(folder: Path, factor: float = 8.0) -> None:
    """Scale every query/key projection of a saved model by `factor` (in place), so attention is far
    from uniform and position or mask errors change the logits."""
    from safetensors.numpy import load_file, save_file

    for f in folder.glob("*.safetensors"):
        tensors = load_file(str(f))
        for k in tensors:
            if any(s in k for s in ("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "query_key_value.weight")):
                tensors[k] = tensors[k] * factor
        save_file(tensors, str(f), metadata={"format": "pt"})


def sharpened_models(root: Path, tokenizer_dir: Path, variants: dict[str, tuple[str, dict]]):
    """`get(name)`: a sharpened tiny model of a family, or of a `variants` entry (name -> (family,
    overrides)), built on first use under `root` and reused after."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            family, overrides = variants.get(name, (name, {}))
            built[name] = build_family(family, root / name, tokenizer_dir, **overrides)
            sharpen(built[name])
        return built[name]

    return get
