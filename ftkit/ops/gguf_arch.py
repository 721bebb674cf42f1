"""What llama.cpp expects of each model family: its GGUF architecture, tensor names (the gguf package's own maps),
q/k row order, norm convention and hyperparameters; models it would compute differently are refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftkit.common.errors import FtkitError


@dataclass(frozen=True)
class Family:
    """What llama.cpp's convert_hf_to_gguf.py does for one config.json model_type."""

    arch: str  # the gguf.MODEL_ARCH member it writes
    permute_qk: bool = False  # q/k rows reordered to GGUF's interleaved RoPE (llama.cpp's LlamaModel)
    norm_shift: float = 0.0  # added to every "...norm.weight" in the fused model (Gemma's 1 + w)
    # llama.cpp's fixed choice of renormalising the top-k expert weights (None: not a mixture of experts)
    norm_topk: bool | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),
    "mixtral": Family("LLAMA", permute_qk=True, norm_topk=True),
    "granite": Family("GRANITE", permute_qk=True),
    "smollm3": Family("SMOLLM3", permute_qk=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "qwen2_moe": Family("QWEN2MOE", norm_topk=False),
    "qwen3_moe": Family("QWEN3MOE", norm_topk=True),
    "olmoe": Family("OLMOE", norm_topk=False),
    "phi3": Family("PHI3"),
    "gemma": Family("GEMMA", norm_shift=1.0),
    "gemma2": Family("GEMMA2", norm_shift=1.0),
    "gemma3_text": Family("GEMMA3", norm_shift=1.0),
    "olmo2": Family("OLMO2"),
    "olmo3": Family("OLMO2"),
    "cohere": Family("COMMAND_R"),
    "starcoder2": Family("STARCODER2"),
}


def load_gguf():
    try:
        import gguf
    except ImportError as e:
        raise FtkitError("GGUF export needs the gguf package: pip install 'gguf>=0.10' (in ftkit[torch] and ftkit[dev]).") from e
    return gguf


def to_gguf_rope_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> GGUF's interleaved pairs (llama.cpp's `permute`); the inverse of
    ftkit.convert._interleaved_to_halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def family_of(gguf, config: dict[str, Any], what: str) -> tuple[Family, Any]:
    """The family's conversion rules and its gguf.MODEL_ARCH, or an error naming the covered families."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise FtkitError(f"{what}: model_type {model_type!r} is not supported for GGUF export "
                         f"(supported: {', '.join(sorted(FAMILIES))}); llama.cpp's convert_lora_to_gguf.py "
                         "and convert_hf_to_gguf.py cover more.")
    arch = getattr(gguf.MODEL_ARCH, family.arch, None)
    if arch is None:
        raise FtkitError(f"{what}: the installed gguf package does not know llama.cpp's {family.arch.lower()} "
                         f"architecture (for model_type {model_type!r}); upgrade it: pip install -U gguf.")
    return family, arch


def n_experts(config: dict[str, Any]) -> int:
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)


def qk_heads(config: dict[str, Any]) -> dict[str, int]:
    """Heads per projection for the RoPE permutation: q has all heads, k the key/value heads."""
    n_head = config["num_attention_heads"]
    return {"q_proj": n_head, "k_proj": config.get("num_key_value_heads") or n_head}


def gguf_name(names, key: str, where: str, arch_name: str) -> str:
    gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise FtkitError(f"{where}: no GGUF tensor for {key} in llama.cpp's {arch_name} architecture; "
                         "llama.cpp cannot apply it (leave that module out of method.targets).")
    return gname


def _rope(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """RoPE as transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters, per layer type) keeps it:
    {"theta", "theta_swa", "dims_factor", "linear"}; scalings llama.cpp reads from other tensors are refused."""
    params = config.get("rope_parameters") or {}
    full = params.get("full_attention", params)
    swa = params.get("sliding_attention") or {}
    scaling = config.get("rope_scaling") or full
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "linear"):
        raise FtkitError(f"{folder}: rope scaling {kind!r} is not exported; "
                         "use llama.cpp's convert_hf_to_gguf.py for this model.")
    return {
        "theta": float(full.get("rope_theta") or config.get("rope_theta") or 10000.0),
        "theta_swa": swa.get("rope_theta") or config.get("rope_local_base_freq"),
        "dims_factor": float(full.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0),
        "linear": scaling.get("factor") if kind == "linear" else None,
    }


def _swa_layers(config: dict[str, Any]) -> list[bool] | None:
    """Which layers use the sliding window, from transformers' layer_types; written as llama.cpp's
    per-layer pattern so that it does not fall back to its own default period."""
    types = config.get("layer_types")
    if types:
        return [t == "sliding_attention" for t in types]
    period = config.get("sliding_window_pattern")  # transformers 4's Gemma 3: every period-th layer is global
    if isinstance(period, int) and period > 0:
        return [(i + 1) % period != 0 for i in range(config["num_hidden_layers"])]
    return None


def check_runs_alike(config: dict[str, Any], family: Family, arch_name: str, folder: Path) -> None:
    """Refuse a model whose settings llama.cpp hard-codes otherwise for this architecture: the GGUF would
    load and quietly compute something else."""
    problems = []
    if family.norm_topk is not None and bool(config.get("norm_topk_prob", family.norm_topk)) != family.norm_topk:
        problems.append(f"norm_topk_prob = {config.get('norm_topk_prob')}, but llama.cpp's {arch_name} always "
                        f"{'renormalises' if family.norm_topk else 'keeps'} the top-k expert weights")
    if config.get("model_type") == "smollm3" and config.get("no_rope_layers") is not None:
        every_fourth = [int((i + 1) % 4 != 0) for i in range(config["num_hidden_layers"])]
        if list(config["no_rope_layers"]) != every_fourth:
            problems.append("no_rope_layers differs from llama.cpp's fixed pattern (every 4th layer without RoPE)")
    n_head = config["num_attention_heads"]
    if family.arch == "OLMOE" and (config.get("num_key_value_heads") or n_head) != n_head:
        problems.append(f"num_key_value_heads = {config['num_key_value_heads']}, but llama.cpp's {arch_name} sizes "
                        "the key norm for as many key/value heads as query heads")
    scalar = config.get("query_pre_attn_scalar")
    if family.arch in ("GEMMA2", "GEMMA3") and scalar is not None:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        big = config["num_hidden_layers"] in (46, 62)  # llama.cpp's 27B rule scales by hidden / heads
        want = config["hidden_size"] // config["num_attention_heads"] if big else head_dim
        if scalar != want:
            problems.append(f"query_pre_attn_scalar = {scalar}, but llama.cpp's {arch_name} scales attention by "
                            f"1/sqrt({want})")
    if problems:
        raise FtkitError(f"{folder}: {'; '.join(problems)}. llama.cpp would compute another model from this GGUF, "
                         "so it is not written; serve this model in Hugging Face format instead.")


def hparams(gguf, writer, config: dict[str, Any], family: Family, folder: Path) -> None:
    """The metadata llama.cpp's loader reads for the architecture, as convert_hf_to_gguf.py writes it
    (TextModel.set_gguf_parameters and the family class's additions)."""
    n_head, hidden = config["num_attention_heads"], config["hidden_size"]
    # Granite's converter ignores head_dim (llama.cpp's granite graph assumes hidden / heads).
    head_dim = (family.arch != "GRANITE" and config.get("head_dim")) or hidden // n_head
    rope = _rope(config, folder)
    context = config.get("max_position_embeddings", 2048)
    if family.arch == "COMMAND_R":  # Command R's max_position_embeddings undersells what it was trained on
        context = config.get("model_max_length") or context
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope["dims_factor"]))
    writer.add_rope_freq_base(rope["theta"])
    if rope["theta_swa"] is not None:
        writer.add_rope_freq_base_swa(float(rope["theta_swa"]))
    if rope["linear"]:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["linear"]))
    if "rms_norm_eps" in config:
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    eps = config.get("layer_norm_eps", config.get("norm_epsilon"))
    if eps is not None:
        writer.add_layer_norm_eps(eps)
    if n_experts(config):
        writer.add_expert_count(n_experts(config))
        writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_vocab_size(config["vocab_size"])
    _ARCH_HPARAMS.get(family.arch, lambda *_: None)(gguf, writer, config)


def _granite_hparams(gguf, writer, config: dict[str, Any]) -> None:
    # GraniteModel's *_multiplier -> *_scale; llama.cpp falls back to plain Llama for an absent one but
    # requires logit_scale.
    for key, add in (("attention_multiplier", writer.add_attention_scale), ("embedding_multiplier", writer.add_embedding_scale),
                     ("residual_multiplier", writer.add_residual_scale)):
        if config.get(key):
            add(float(config[key]))
    writer.add_logit_scale(float(config.get("logits_scaling") or 1.0))


def _gemma2_hparams(gguf, writer, config: dict[str, Any]) -> None:
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    _sliding_window(gguf, writer, config)


def _sliding_window(gguf, writer, config: dict[str, Any]) -> None:
    window, layers = config.get("sliding_window"), _swa_layers(config)
    if window and (layers is None or any(layers)):
        writer.add_sliding_window(window)
        if layers is not None:
            writer.add_sliding_window_pattern(layers)


def _moe_hparams(gguf, writer, config: dict[str, Any]) -> None:
    if config.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _command_r_hparams(gguf, writer, config: dict[str, Any]) -> None:
    writer.add_logit_scale(config.get("logit_scale", 1.0))
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def _phi3_hparams(gguf, writer, config: dict[str, Any]) -> None:
    params = config.get("rope_parameters") or {}
    original = params.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    writer.add_rope_scaling_orig_ctx_len(original or config.get("max_position_embeddings", 4096))
    writer.add_sliding_window(config.get("sliding_window") or 0)  # 0 tells llama.cpp: no sliding window


_ARCH_HPARAMS = {
    "GRANITE": _granite_hparams,
    "GEMMA2": _gemma2_hparams,
    "GEMMA3": _gemma2_hparams,  # no attention soft-capping in Gemma 3's config, the rest alike
    "OLMO2": _sliding_window,
    "QWEN2MOE": _moe_hparams,
    "QWEN3MOE": _moe_hparams,
    "COMMAND_R": _command_r_hparams,
    "PHI3": _phi3_hparams,
}
