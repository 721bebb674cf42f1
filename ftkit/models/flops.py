"""A decoder's matrix shapes, read from its Hugging Face config: what FLOP accounting multiplies.

`Architecture.from_config(config)` lists, per decoder block, the linear layers a token passes through
(their Hugging Face leaf names, shapes, and the stage of the block they sit in) and the block's
attention window; ftkit.train.flops turns that into the FLOPs of a training step. Only matrix products
are counted (2 FLOPs per multiply-add), as MFU is counted in the field (PaLM, Megatron); norms,
activations, RoPE, softmax and the embedding lookup are left out.

Shapes that change the count: grouped-query attention (k/v with `num_key_value_heads`), an explicit
`head_dim`, fused projections (phi3's `qkv_proj` and `gate_up_proj`), gated or plain MLPs, mixtures of
experts (the router, `num_experts_per_tok` active experts of `num_experts`, shared experts, dense layers
between sparse ones), sliding-window layers (`layer_types`, else `sliding_window` on every layer), and
parallel blocks (cohere: attention and MLP both read the block's input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ftkit.common.errors import FtkitError

# The order of a block's stages: a stage's input carries a gradient once an earlier stage holds a trained weight.
STAGES = ("attn_in", "attn_out", "mlp_in", "mlp_out")

# Families whose MLP is up -> activation -> down (no gate), and the names of their two layers.
PLAIN_MLP = {"starcoder2": ("c_fc", "c_proj"), "gpt2": ("c_fc", "c_proj"), "gpt_bigcode": ("c_fc", "c_proj"),
             "gpt_neox": ("dense_h_to_4h", "dense_4h_to_h"), "falcon": ("dense_h_to_4h", "dense_4h_to_h"),
             "gptj": ("fc_in", "fc_out"), "phi": ("fc1", "fc2"), "opt": ("fc1", "fc2"), "codegen": ("fc_in", "fc_out")}
# Families whose attention and MLP both read the block's input (x + attn(norm(x)) + mlp(norm(x))).
PARALLEL = {"cohere", "cohere2", "gptj", "phi", "codegen"}


@dataclass(frozen=True)
class Linear:
    name: str  # the Hugging Face path inside the block: "self_attn.q_proj", "mlp.experts.gate_up_proj"
    fan_in: int
    fan_out: int
    stage: str  # one of STAGES
    active: float = 1.0  # weight copies each token passes through (a routed expert: top_k of them)
    copies: int = 1  # weight copies held (routed experts: num_experts)
    router: bool = False  # never adapted

    @property
    def macs(self) -> float:
        """Multiply-adds per token."""
        return self.fan_in * self.fan_out * self.active


@dataclass(frozen=True)
class Block:
    linears: tuple[Linear, ...]
    window: int | None  # sliding-window attention: each query sees at most this many keys


@dataclass(frozen=True)
class Architecture:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    blocks: tuple[Block, ...]
    parallel: bool = False  # attention and MLP read the block's input side by side (PARALLEL)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        """The shapes of a Hugging Face config.json (a multimodal config's `text_config`); FtkitError
        naming the missing key when it is not a decoder this module can read."""
        text = config.get("text_config")
        cfg = {**config, **text} if isinstance(text, dict) and text.get("hidden_size") else config
        model_type = str(cfg.get("model_type", ""))

        def get(*keys: str, default: Any = None) -> Any:
            for k in keys:
                if cfg.get(k) is not None:
                    return cfg[k]
            if default is None:
                raise FtkitError(f"FLOP accounting: the model's config.json has none of {list(keys)} ({model_type or 'unknown'} model); "
                                 "its FLOPs (and MFU) are left out of the metrics.")
            return default

        hidden, layers = int(get("hidden_size", "n_embd", "d_model")), int(get("num_hidden_layers", "n_layer", "num_layers"))
        heads = int(get("num_attention_heads", "n_head"))
        kv = int(get("num_key_value_heads", default=1 if cfg.get("multi_query") else heads))
        head_dim = int(get("head_dim", default=hidden // heads))
        inter = int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
        vocab = int(get("vocab_size"))
        q, k = heads * head_dim, kv * head_dim
        if model_type == "phi3":
            attn = [Linear("self_attn.qkv_proj", hidden, q + 2 * k, "attn_in")]
        else:
            attn = [Linear(f"self_attn.{n}", hidden, d, "attn_in") for n, d in (("q_proj", q), ("k_proj", k), ("v_proj", k))]
        attn.append(Linear("self_attn.o_proj", q, hidden, "attn_out"))
        windows = _windows(cfg, layers)
        blocks = []
        for i in range(layers):
            mlp = _moe(cfg, i, hidden, inter) if _sparse(cfg, i) else _dense_mlp(model_type, hidden, inter)
            blocks.append(Block(tuple(attn + mlp), windows[i]))
        parallel = model_type in PARALLEL or bool(cfg.get("use_parallel_residual") or cfg.get("parallel_attn"))
        return cls(hidden, heads, kv, head_dim, vocab, inter, tuple(blocks), parallel)

    @property
    def head_macs(self) -> int:
        """Multiply-adds of the output head per position it runs at (tied to the embeddings or not)."""
        return self.hidden * self.vocab

    def parameters(self) -> int:
        """Matrix weights held, routers and every expert included (no norms, biases or embeddings but the head)."""
        return sum(lin.fan_in * lin.fan_out * lin.copies for b in self.blocks for lin in b.linears) + self.head_macs

    def attention_pairs(self, lengths: np.ndarray, window: int | None, prefix: int = 0, causal: bool = True) -> int:
        """Query-key pairs of one layer over examples of these lengths, each attending only inside itself:
        causal (query i sees keys 1..i, at most `window` of them), plus `prefix` virtual keys every query
        sees (prefix tuning). `causal=False`: every query sees every key (what a dense kernel computes)."""
        n = np.asarray(lengths, dtype=np.int64)
        if not causal:
            return int((n * (n + prefix)).sum())
        if window is None or window <= 0:
            pairs = n * (n + 1) // 2
        else:
            w = np.minimum(n, window)
            pairs = w * (w + 1) // 2 + (n - w) * window
        return int(pairs.sum() + n.sum() * prefix)

    def gemm_shapes(self, tokens: int) -> list[tuple[int, int, int]]:
        """(m, k, n) of the block's typical matrix products over `tokens` rows: hidden x hidden, hidden x intermediate."""
        return [(tokens, self.hidden, self.hidden), (tokens, self.hidden, self.intermediate)]


def _windows(cfg: dict[str, Any], layers: int) -> list[int | None]:
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return [window if t == "sliding_attention" and window else None for t in types]
    if window and cfg.get("use_sliding_window", True):
        return [int(window)] * layers
    return [None] * layers


def _dense_mlp(model_type: str, hidden: int, inter: int, prefix: str = "mlp.") -> list[Linear]:
    if model_type in PLAIN_MLP:
        up, down = PLAIN_MLP[model_type]
        return [Linear(prefix + up, hidden, inter, "mlp_in"), Linear(prefix + down, inter, hidden, "mlp_out")]
    if model_type == "phi3":
        return [Linear(prefix + "gate_up_proj", hidden, 2 * inter, "mlp_in"), Linear(prefix + "down_proj", inter, hidden, "mlp_out")]
    return [Linear(prefix + "gate_proj", hidden, inter, "mlp_in"), Linear(prefix + "up_proj", hidden, inter, "mlp_in"),
            Linear(prefix + "down_proj", inter, hidden, "mlp_out")]


def _experts(cfg: dict[str, Any]) -> int:
    return int(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)


def _sparse(cfg: dict[str, Any], i: int) -> bool:
    """Whether block i holds a mixture of experts (Qwen: `decoder_sparse_step`, `mlp_only_layers`;
    DeepSeek: `first_k_dense_replace`, `moe_layer_freq`)."""
    if _experts(cfg) <= 1:
        return False
    if i in (cfg.get("mlp_only_layers") or []) or i < int(cfg.get("first_k_dense_replace") or 0):
        return False
    step = int(cfg.get("decoder_sparse_step") or cfg.get("moe_layer_freq") or 1)
    return (i + 1) % step == 0 if "decoder_sparse_step" in cfg else i % step == 0


def _moe(cfg: dict[str, Any], i: int, hidden: int, inter: int) -> list[Linear]:
    """A mixture-of-experts MLP: the router, top_k of num_experts gated experts per token, shared experts."""
    experts, top_k = _experts(cfg), int(cfg.get("num_experts_per_tok") or cfg.get("num_selected_experts") or 1)
    size = int(cfg.get("moe_intermediate_size") or inter)
    out = [Linear("mlp.gate", hidden, experts, "mlp_in", router=True),
           Linear("mlp.experts.gate_up_proj", hidden, 2 * size, "mlp_in", active=top_k, copies=experts),
           Linear("mlp.experts.down_proj", size, hidden, "mlp_out", active=top_k, copies=experts)]
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    if shared:  # Qwen2-MoE: one shared expert, scaled by a sigmoid gate
        out += _dense_mlp("", hidden, shared, "mlp.shared_expert.")
        out.append(Linear("mlp.shared_expert_gate", hidden, 1, "mlp_in"))
    elif cfg.get("n_shared_experts"):  # DeepSeek: n shared experts of the routed experts' size, as one MLP
        out += _dense_mlp("", hidden, size * int(cfg["n_shared_experts"]), "mlp.shared_experts.")
    return out
