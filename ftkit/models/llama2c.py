"""llama2.c `.bin` checkpoints (version 0 layout, sentencepiece tokenizer) -> Hugging Face Llama folder."""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ftkit.common.errors import FtkitError
from ftkit.models.gguf import set_rope_theta

_LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c's versioned exports, whose layout differs from v0


def llama2c_layout(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...]]]]:
    """The header and the array shapes of a llama2.c legacy (version 0) checkpoint; checks the file size.

    Layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then
    float32 arrays in llama2.c export.py's `legacy_export` order; a negative vocab_size means a
    separate classifier follows at the end, a positive one that it is tied to the embedding.
    """
    with open(path, "rb") as f:
        raw = f.read(28)
    size = path.stat().st_size
    if len(raw) < 28:
        raise FtkitError(f"{path}: too short to be a llama2.c checkpoint.")
    if struct.unpack_from("<I", raw)[0] == _LLAMA2C_MAGIC:
        raise FtkitError(
            f"{path}: a versioned llama2.c export; ftkit reads the legacy one. Re-export it with "
            f"llama2.c's `python export.py out.bin --version 0 --checkpoint ...`."
        )
    fields = struct.unpack_from("<7i", raw)
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = fields
    shared = vocab > 0
    vocab = abs(vocab)
    sane = (
        min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) > 0
        and dim % heads == 0
        and heads % kv_heads == 0
        and (dim // heads) % 2 == 0
    )
    if not sane:
        raise FtkitError(f"{path}: not a llama2.c checkpoint (its header would be {fields}).")
    head = dim // heads
    kv_dim = kv_heads * head
    shapes = [
        ("embed", (vocab, dim)),
        ("attn_norm", (layers, dim)),
        ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)),
        ("ffn_norm", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cos", (seq_len, head // 2)),
        ("freq_sin", (seq_len, head // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    expected = 28 + 4 * sum(math.prod(shape) for _, shape in shapes)
    if size != expected:
        raise FtkitError(
            f"{path}: {size} bytes, but a llama2.c checkpoint with the header it would have is {expected}; "
            f"not a llama2.c .bin. (A PyTorch .bin loads from its Hugging Face folder instead.)"
        )
    header = dict(dim=dim, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, seq_len=seq_len, shared=shared)
    return header, shapes


def _read_llama2c(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:

    header, shapes = llama2c_layout(path)
    count = sum(math.prod(shape) for _, shape in shapes)
    flat = np.fromfile(path, dtype="<f4", offset=28, count=count)
    arrays, at = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        arrays[name] = flat[at : at + n].reshape(shape)
        at += n
    return header, arrays


def _interleaved_to_halves(w: Any, n_heads: int) -> Any:
    """Reorder q/k rows from RoPE on adjacent pairs (x[2i], x[2i+1]) -- llama2.c, Meta, GGUF -- to
    transformers' rotate-half pairs (x[i], x[i + head/2]); the `permute` of convert_llama_weights_to_hf.py."""
    out_features, in_features = w.shape
    half = out_features // n_heads // 2
    return w.reshape(n_heads, half, 2, in_features).transpose(0, 2, 1, 3).reshape(out_features, in_features)


def _rope_theta_of(freq_cos: Any, freq_sin: Any, head: int) -> float:
    """The RoPE base the checkpoint's cos/sin tables were built with.

    llama2.c trains with 10000, but a fork may not, and a wrong base would go unnoticed: the model
    would load and run, only worse. The tables the file carries settle it.
    """

    half = head // 2
    if half < 2 or freq_cos.shape[0] < 2:
        return 10000.0
    # At position 1 the angle of pair i is theta ** (-2i / head); the last pair pins theta best.
    angle = float(np.arctan2(freq_sin[1, half - 1], freq_cos[1, half - 1]))
    if not angle > 0:
        raise FtkitError("the checkpoint's RoPE tables are not RoPE tables; is this a llama2.c checkpoint?")
    estimate = angle ** (-head / (2 * (half - 1)))
    positions = np.arange(freq_cos.shape[0], dtype=np.float64)[:, None]
    for theta in (float(f"{estimate:.4g}"), estimate):
        angles = positions * theta ** (-2 * np.arange(half) / head)
        if np.allclose(np.cos(angles), freq_cos, atol=1e-3) and np.allclose(np.sin(angles), freq_sin, atol=1e-3):
            return theta
    raise FtkitError("the checkpoint's RoPE tables match no RoPE base; is this a llama2.c checkpoint?")


def convert_llama2c(source: Path, tok_file: Path, dest: Path, dtype: str, note: Callable[[str], None]) -> list[str]:
    import torch  # lazy: torch is a backend's
    import transformers  # lazy: slow to import
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy: slow to import

    note(f"reading {source.name}")
    h, a = _read_llama2c(source)
    theta = _rope_theta_of(a["freq_cos"], a["freq_sin"], h["dim"] // h["heads"])

    # Tokenizer first: a checkpoint paired with the wrong tokenizer should fail before anything is written.
    shutil.copyfile(tok_file, dest / "tokenizer.model")
    tok_cls = getattr(transformers, "LlamaTokenizerFast", None) or transformers.LlamaTokenizer
    try:
        # llama2.c prepends BOS to every prompt and trained on text that way.
        tok = tok_cls.from_pretrained(dest, add_bos_token=True, add_eos_token=False)
    except (ImportError, ValueError, OSError) as e:
        raise FtkitError(
            f"{tok_file}: could not read it as a sentencepiece tokenizer ({e}). It needs the "
            f"sentencepiece and protobuf packages."
        ) from e
    if len(tok) != h["vocab"]:
        raise FtkitError(
            f"{tok_file} has {len(tok)} tokens, but {source.name} was trained with {h['vocab']}: "
            f"not its tokenizer. Pass the right one with tokenizer=..."
        )
    tok.model_max_length = h["seq_len"]
    tok.save_pretrained(dest)

    config = LlamaConfig(
        vocab_size=h["vocab"],
        hidden_size=h["dim"],
        intermediate_size=h["hidden"],
        num_hidden_layers=h["layers"],
        num_attention_heads=h["heads"],
        num_key_value_heads=h["kv_heads"],
        max_position_embeddings=h["seq_len"],
        rms_norm_eps=1e-5,  # llama2.c's RMSNorm hard-codes it
        rope_theta=theta,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=h["shared"],
        bos_token_id=1,  # sentencepiece's fixed ids, which llama2.c's run.c relies on
        eos_token_id=2,
        pad_token_id=None,
    )
    state = {"model.embed_tokens.weight": a["embed"], "model.norm.weight": a["norm"]}
    for i in range(h["layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = a["attn_norm"][i]
        state[p + "self_attn.q_proj.weight"] = _interleaved_to_halves(a["wq"][i], h["heads"])
        state[p + "self_attn.k_proj.weight"] = _interleaved_to_halves(a["wk"][i], h["kv_heads"])
        state[p + "self_attn.v_proj.weight"] = a["wv"][i]
        state[p + "self_attn.o_proj.weight"] = a["wo"][i]
        state[p + "post_attention_layernorm.weight"] = a["ffn_norm"][i]
        state[p + "mlp.gate_proj.weight"] = a["w1"][i]
        state[p + "mlp.down_proj.weight"] = a["w2"][i]
        state[p + "mlp.up_proj.weight"] = a["w3"][i]
    if not h["shared"]:
        state["lm_head.weight"] = a["wcls"]

    note("writing the Hugging Face folder")
    model = LlamaForCausalLM(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (h["shared"] and k == "lm_head.weight")]
    if missing or unexpected:  # a transformers whose Llama names weights differently
        raise FtkitError(f"llama2.c conversion: weights missing {missing}, unexpected {unexpected}.")
    model.to(getattr(torch, dtype)).save_pretrained(dest)

    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    set_rope_theta(cfg, theta)  # not a fix: transformers 5 just keeps it where mlx-lm does not look
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return []
