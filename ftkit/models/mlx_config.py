"""One reading of a Hugging Face `config.json` for mlx-lm, so that a model computes on MLX what it
computes in transformers, or is refused with the reason.

transformers 5 writes configs that mlx-lm 0.32 half reads: `rope_theta` and the RoPE scaling moved into
`rope_parameters` (nested per layer type for Gemma 3 and OLMo 3), `num_experts` became
`num_local_experts`. And where mlx-lm reads a key, some of its model classes compute something else:
they ignore sliding windows (Mistral, Gemma 2, Phi-3, Qwen ...), build a plain RoPE whatever the scaling
(Gemma, Mixtral, the Qwen MoEs ...), or apply LongRoPE's long factors at every length (transformers uses
the short ones up to the original context). Each of those is a silent numerical difference.

`plan(config)` answers all of it at once, from the config dict alone (no MLX here):

- `overrides`: the keys mlx-lm's `ModelArgs` read, put where and how they read them (load_model's
  `model_config`);
- `patches`: per layer, the sliding window and/or the RoPE that ftkit installs into the loaded model
  where mlx-lm's class would differ (ftkit_mlx.patches applies them);
- `context_limit`: the longest sequence the two backends compute alike, where a patch cannot make them
  agree (`check_context` refuses a longer `data.max_seq_length` before any weight is read).

A config the plan cannot make agree is an FtkitError naming the family, the setting and what to do.
Families outside FAMILIES get the key translation only: how their mlx-lm class reads the rest is not
known here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ftkit.common.errors import FtkitError

SLIDING, FULL = "sliding_attention", "full_attention"
# RoPE scalings mlx-lm's `initialize_rope` builds the way transformers does (LongRoPE is not among
# them: mlx-lm's applies the long factors at every length).
INIT_SCALINGS = ("default", "linear", "dynamic", "llama3", "yarn")
# What ftkit can install in any layer: the above, and its own length-switching LongRoPE.
INSTALLABLE = (*INIT_SCALINGS, "longrope")
TO_TORCH = "use --backend torch for this model"


@dataclass(frozen=True)
class Family:
    """How transformers and mlx-lm's class for one `model_type` place windows and build RoPE.

    hf_windows: where transformers applies `sliding_window`: "none", "all" layers, or the layers that
      `layer_types` marks sliding (`default_types` gives those when the config has no list).
    gate: a config flag that must be true for the window to count (transformers sets it to None otherwise).
    mlx_windows: what mlx-lm's class windows by itself: "none"; "llama" (layer_types, and at least one
      full layer); "olmo3" (layer_types, at least one of each); "gemma3" (sliding_window_pattern).
    mlx_rope: how mlx-lm's class builds RoPE: "init" (initialize_rope with rope_scaling, every layer);
      "plain" (nn.RoPE, any scaling ignored); "phi3" (plain, or an always-long LongRoPE; its linear needs
      long_factor); "gemma3" and "olmo3" (scaled RoPE on full layers, a plain one on sliding layers).
    theta: transformers' base when a config names none ({"full", "sliding"} for per-type bases).
    """

    hf_windows: str = "none"
    default_types: Callable[[Mapping[str, Any], int], list[str]] | None = None
    gate: str | None = None
    mlx_windows: str = "none"
    mlx_rope: str = "init"
    theta: float | Mapping[str, float] = 10000.0


def _every(period: int) -> Callable[[Mapping[str, Any], int], list[str]]:
    """Sliding except every `period`-th layer (Gemma 2: 2, OLMo 3: 4)."""
    return lambda config, n: [SLIDING if (i + 1) % period else FULL for i in range(n)]


def _gemma3_types(config: Mapping[str, Any], n: int) -> list[str]:
    period = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
    return _every(int(period))(config, n)


def _qwen_types(config: Mapping[str, Any], n: int) -> list[str]:
    start = config.get("max_window_layers", 28)
    return [SLIDING if i >= start else FULL for i in range(n)]


def _qwen2_moe_types(config: Mapping[str, Any], n: int) -> list[str]:
    stop = config.get("max_window_layers", 28)
    return [SLIDING if (i + 1) % 2 and i < stop else FULL for i in range(n)]


def _smollm3_types(config: Mapping[str, Any], n: int) -> list[str]:
    return [SLIDING if not has_rope else FULL for has_rope in _smollm3_rope_layers(config, n)]


def _smollm3_rope_layers(config: Mapping[str, Any], n: int) -> list[int]:
    interval = config.get("no_rope_layer_interval", 4)
    return list(config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)])


FAMILIES: dict[str, Family] = {
    "llama": Family(mlx_windows="llama"),
    "mistral": Family(hf_windows="all", mlx_windows="llama"),
    "qwen2": Family(hf_windows="layer_types", default_types=_qwen_types, gate="use_sliding_window"),
    "qwen3": Family(hf_windows="layer_types", default_types=_qwen_types, gate="use_sliding_window"),
    "gemma": Family(mlx_rope="plain"),
    "gemma2": Family(hf_windows="layer_types", default_types=_every(2), mlx_rope="plain"),
    "gemma3_text": Family(hf_windows="layer_types", default_types=_gemma3_types, mlx_windows="gemma3", mlx_rope="gemma3",
                          theta={"full": 1_000_000.0, "sliding": 10_000.0}),
    "phi3": Family(hf_windows="all", mlx_rope="phi3"),
    "olmo2": Family(),
    "granite": Family(),
    # no gate: SmolLM3's masks window every layer typed sliding (its default types already ask the flag)
    "smollm3": Family(hf_windows="layer_types", default_types=_smollm3_types, mlx_windows="llama", theta=2_000_000.0),
    "olmo3": Family(hf_windows="layer_types", default_types=_every(4), mlx_windows="olmo3", mlx_rope="olmo3", theta=500_000.0),
    "cohere": Family(mlx_rope="plain", theta=500_000.0),
    "starcoder2": Family(hf_windows="all", mlx_rope="plain"),
    "mixtral": Family(hf_windows="all", mlx_rope="plain", theta=1_000_000.0),
    "qwen3_moe": Family(hf_windows="all", gate="use_sliding_window", mlx_rope="plain"),
    "qwen2_moe": Family(hf_windows="layer_types", default_types=_qwen2_moe_types, gate="use_sliding_window", mlx_rope="plain"),
    "olmoe": Family(),
}


@dataclass(frozen=True)
class Rope:
    """The RoPE of one layer: its base, and for a scaled one its parameters as mlx-lm spells them
    (`type` and `rope_type` both set, every length and factor resolved as transformers resolves it)."""

    theta: float
    scaling: Mapping[str, Any] | None = None

    @property
    def kind(self) -> str:
        return self.scaling["rope_type"] if self.scaling else "default"


@dataclass(frozen=True)
class LayerPatch:
    """What ftkit installs in one layer: the sliding window transformers applies there (mlx-lm's class
    does not), and/or the RoPE transformers applies there (mlx-lm's class builds another)."""

    window: int | None = None
    rope: Rope | None = None


@dataclass(frozen=True)
class MlxPlan:
    family: str
    overrides: dict[str, Any]
    patches: dict[int, LayerPatch] = field(default_factory=dict)
    max_position_embeddings: int | None = None
    context_limit: int | None = None
    limit_reason: str = ""


# ---------------------------------------------------------------------------------------------- RoPE


def _resolve_scaling(family: str, config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any] | None:
    """One layer type's rope parameters, in mlx-lm's spelling with transformers' defaults filled in;
    None for the plain RoPE. Refuses what neither mlx-lm nor ftkit computes as transformers does."""
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind == "su":
        kind = "longrope"  # transformers' older name for it
    if kind not in INSTALLABLE:
        raise FtkitError(f"{family}: RoPE scaling '{kind}' is not computed by mlx-lm for this family, nor by ftkit; {TO_TORCH}.")
    keep = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "rope_type", "partial_rotary_factor")}
    out: dict[str, Any] = {**keep, "type": kind, "rope_type": kind}
    max_pos = config.get("max_position_embeddings")
    if kind in ("llama3", "yarn", "longrope"):
        # Phi-3 keeps the pre-training length beside rope_parameters, and transformers prefers it there
        original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        out["original_max_position_embeddings"] = int(original or max_pos)
    if "factor" in out and out["factor"] is not None:
        out["factor"] = float(out["factor"])  # mlx-lm's Phi-3 asserts a float
    if kind == "yarn":
        _resolve_yarn(family, out, max_pos)
    elif kind == "longrope":
        _resolve_longrope(out, max_pos)
    elif kind == "llama3":
        out.setdefault("low_freq_factor", 1.0)
        out.setdefault("high_freq_factor", 4.0)
    elif kind == "dynamic" and not max_pos:
        raise FtkitError(f"{family}: dynamic RoPE scaling needs max_position_embeddings in config.json; {TO_TORCH}.")
    return out


def _resolve_yarn(family: str, out: dict[str, Any], max_pos: int | None) -> None:
    if out.get("factor") is None:
        out["factor"] = float(max_pos / out["original_max_position_embeddings"])
    if out.pop("truncate", True) is False:
        raise FtkitError(f"{family}: yarn RoPE with truncate = false is not computed by mlx-lm (its YarnRoPE always "
                         f"truncates the correction range); {TO_TORCH}.")
    # transformers reads `beta_* or default`; mlx-lm passes a present key on, None included
    out["beta_fast"] = out.get("beta_fast") or 32
    out["beta_slow"] = out.get("beta_slow") or 1
    if not (out.get("mscale") and out.get("mscale_all_dim")):
        # transformers uses mscale only together with mscale_all_dim; mlx-lm's defaults give its plain factor
        out.pop("mscale", None)
        out.pop("mscale_all_dim", None)
    given = out.pop("attention_factor", None)
    if given is not None and not math.isclose(float(given), _yarn_mscale(out), rel_tol=1e-9):
        out["attention_factor"] = float(given)  # mlx-lm derives its own: ftkit installs this one (OLMo 3's equals it)


def _yarn_mscale(out: Mapping[str, Any]) -> float:
    """The attention factor mlx-lm's YarnRoPE derives (transformers' too when the config gives none)."""
    def get(scale: float, m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = out["factor"]
    return get(factor, out.get("mscale", 1)) / get(factor, out.get("mscale_all_dim", 0))


def _resolve_longrope(out: dict[str, Any], max_pos: int | None) -> None:
    original = out["original_max_position_embeddings"]
    factor = out.get("factor") or (max_pos / original if max_pos else 1.0)
    if out.get("attention_factor") is None:
        out["attention_factor"] = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    out["attention_factor"] = float(out["attention_factor"])


def _rope_parameters(config: Mapping[str, Any], spec: Family) -> dict[str, dict[str, Any]]:
    """transformers' rope parameters per layer type ("full", "sliding"), read as transformers 5 reads a
    config: `rope_parameters`, or a 4.x `rope_scaling` (which wins, as there) with `rope_theta`, and the
    family's default base where the config names none."""
    default = spec.theta if isinstance(spec.theta, Mapping) else {"full": spec.theta, "sliding": spec.theta}
    params = dict(config.get("rope_parameters") or {})
    legacy = dict(config.get("rope_scaling") or {})
    if spec.mlx_rope not in ("gemma3", "olmo3"):
        flat = legacy or params
        flat.setdefault("rope_theta", config.get("rope_theta") or params.get("rope_theta") or default["full"])
        return {"full": flat, "sliding": flat}
    # per layer type; a 4.x rope_scaling and rope_theta are the full-attention layers' only
    nested = FULL in params or SLIDING in params
    full = {**(params.get(FULL) or {} if nested else params), **legacy}
    sliding = dict(params.get(SLIDING) or {})
    full.setdefault("rope_theta", config.get("rope_theta") or default["full"])
    local = config.get("rope_local_base_freq") if spec.mlx_rope == "gemma3" else None
    sliding.setdefault("rope_theta", local or default["sliding"])
    return {"full": full, "sliding": sliding}


def _hf_ropes(family: str, config: Mapping[str, Any], spec: Family, types: list[str]) -> list[Rope | None]:
    """The RoPE transformers applies in each layer (None: a SmolLM3 layer without RoPE)."""
    params = _rope_parameters(config, spec)
    ropes = {k: Rope(float(p["rope_theta"]), _resolve_scaling(family, config, p)) for k, p in params.items()}
    out: list[Rope | None] = [ropes["sliding" if t == SLIDING else "full"] for t in types]
    if family == "smollm3":
        out = [r if has_rope else None for r, has_rope in zip(out, _smollm3_rope_layers(config, len(types)))]
    return out


def _mlx_ropes(spec: Family, overrides: Mapping[str, Any], mlx_types: list[str], hf: list[Rope | None]) -> list[Rope | None]:
    """The RoPE mlx-lm's class builds in each layer from `overrides`."""
    theta, scaling = float(overrides["rope_theta"]), overrides.get("rope_scaling")
    if spec.mlx_rope == "gemma3":
        local = float(overrides["rope_local_base_freq"])
        return [Rope(local) if t == SLIDING else Rope(theta, scaling) for t in mlx_types]
    if spec.mlx_rope == "olmo3":
        return [Rope(theta) if t == SLIDING else Rope(theta, scaling) for t in mlx_types]
    return [None if h is None else Rope(theta, scaling) for h in hf]


def _supported(spec: Family, rope: Rope) -> bool:
    """Whether mlx-lm's class for this family computes this scaling as transformers does."""
    if spec.mlx_rope in ("plain", "phi3"):
        return rope.kind == "default"
    return rope.kind in INIT_SCALINGS and "attention_factor" not in (rope.scaling or {})


# ------------------------------------------------------------------------------------------- windows


def _window(config: Mapping[str, Any], spec: Family) -> int | None:
    window = config.get("sliding_window")
    if spec.gate and not config.get(spec.gate, False):
        return None
    return int(window) if window else None


def _hf_layout(family: str, config: Mapping[str, Any], spec: Family, n: int) -> tuple[list[str], list[int | None]]:
    """Layer types and the window transformers applies in each layer."""
    window = _window(config, spec)
    if spec.hf_windows == "all":
        return [SLIDING if window else FULL] * n, [window] * n
    types = list(config.get("layer_types") or (spec.default_types(config, n) if spec.default_types else [FULL] * n))
    if len(types) != n:
        raise FtkitError(f"{family}: layer_types has {len(types)} entries for {n} layers; fix config.json.")
    if spec.hf_windows == "none":
        return [FULL] * n, [None] * n
    return types, [window if t == SLIDING else None for t in types]


def _mlx_layout(family: str, spec: Family, hf_types: list[str], windows: list[int | None],
                overrides: dict[str, Any]) -> list[str]:
    """Fill in the keys by which mlx-lm's class windows layers, and return the layer types it will
    then use; the layers that transformers windows and it does not are patched."""
    n = len(hf_types)
    windowed = [w is not None for w in windows]
    if spec.mlx_windows == "llama":
        sizes = {w for w in windows if w is not None}
        if len(sizes) == 1 and not all(windowed):
            types = [SLIDING if w else FULL for w in windowed]
            overrides.update(layer_types=types, sliding_window=sizes.pop())
            return types
        # its model indexes a full layer: a window on every layer (Mistral) is patched in instead
        overrides.update(layer_types=[FULL] * n, sliding_window=None)
        return [FULL] * n
    if spec.mlx_windows == "olmo3":
        if not any(windowed):
            raise FtkitError(f"{family}: no layer has a sliding window (layer_types, sliding_window), and mlx-lm's "
                             f"OLMo 3 needs one; {TO_TORCH}.")
        types = list(hf_types)
        if all(windowed):
            types[-1] = FULL  # its model indexes a full layer; this one is patched back to a window
        overrides.update(layer_types=types, sliding_window=next(w for w in windows if w))
        return types
    if spec.mlx_windows == "gemma3":
        return _gemma3_layout(family, windows, overrides)
    return [FULL] * n


def _gemma3_layout(family: str, windows: list[int | None], overrides: dict[str, Any]) -> list[str]:
    """mlx-lm's Gemma 3 windows every layer but each `sliding_window_pattern`-th. A layer it leaves full
    can be patched to a window; one it windows and transformers does not cannot."""
    n = len(windows)
    full = [i for i, w in enumerate(windows) if w is None]
    period = full[0] + 1 if full else n  # all sliding: its last layer is full (it indexes one), patched back
    types = [SLIDING if (i + 1) % period else FULL for i in range(n)]
    if any(t == SLIDING and w is None for t, w in zip(types, windows)):
        raise FtkitError(f"{family}: layer_types {['S' if w else 'F' for w in windows]} do not repeat with one full "
                         f"layer per period, the only layout mlx-lm's Gemma 3 reads; {TO_TORCH}.")
    overrides["sliding_window_pattern"] = period
    sizes = {w for w in windows if w is not None}
    if sizes:
        overrides["sliding_window"] = sizes.pop()
    return types


# ---------------------------------------------------------------------------------------------- plan


def plan(config: Mapping[str, Any]) -> MlxPlan:
    """How to load `config` (a config.json's dict) with mlx-lm so that it computes as in transformers."""
    if "text_config" in config and "num_hidden_layers" not in config:
        inner = plan(config["text_config"])
        return MlxPlan(inner.family, {"text_config": {**config["text_config"], **inner.overrides}}, inner.patches,
                       inner.max_position_embeddings, inner.context_limit, inner.limit_reason)
    family = str(config.get("model_type", ""))
    overrides = _common_overrides(config)
    spec = FAMILIES.get(family)
    if spec is None:
        return MlxPlan(family, overrides)
    n = int(config["num_hidden_layers"])
    if config.get("use_bidirectional_attention"):
        raise FtkitError(f"{family}: use_bidirectional_attention is not implemented by mlx-lm; {TO_TORCH}.")
    hf_types, windows = _hf_layout(family, config, spec, n)
    hf_ropes = _hf_ropes(family, config, spec, hf_types)
    mlx_types = _mlx_layout(family, spec, hf_types, windows, overrides)
    _rope_overrides(family, config, spec, overrides)
    mlx_ropes = _mlx_ropes(spec, overrides, mlx_types, hf_ropes)
    patches: dict[int, LayerPatch] = {}
    for i in range(n):
        window = windows[i] if mlx_types[i] == FULL else None  # a sliding one mlx-lm windows itself
        rope = hf_ropes[i] if hf_ropes[i] != mlx_ropes[i] else None
        if window is not None or rope is not None:
            patches[i] = LayerPatch(window, rope)
    limit, reason = _context_limit(family, config, hf_ropes)
    return MlxPlan(family, overrides, patches, config.get("max_position_embeddings"), limit, reason)


def _common_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """What every family needs: the base and scaling at the top level where transformers 5 nests them
    (flat rope_parameters only), and both names of the expert count."""
    out: dict[str, Any] = {}
    rope = config.get("rope_parameters") or {}
    if FULL not in rope and SLIDING not in rope:
        if "rope_theta" not in config and "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if not config.get("rope_scaling") and kind != "default":
            out["rope_scaling"] = {**rope, "type": kind, "rope_type": kind}
    for name, other in (("num_experts", "num_local_experts"), ("num_local_experts", "num_experts")):
        if name not in config and config.get(other) is not None:
            out[name] = config[other]
    return out


def _rope_overrides(family: str, config: Mapping[str, Any], spec: Family, overrides: dict[str, Any]) -> None:
    """rope_theta / rope_scaling / rope_local_base_freq as the family's class reads them: the full
    layers' RoPE where it supports it (others are patched); a scaling it does not support is left out."""
    params = _rope_parameters(config, spec)
    full = Rope(float(params["full"]["rope_theta"]), _resolve_scaling(family, config, params["full"]))
    overrides["rope_theta"] = full.theta
    overrides["rope_scaling"] = dict(full.scaling) if full.scaling and _supported(spec, full) else None
    # mlx-lm's Qwen3 falls back to rope_parameters when rope_scaling is None: it would build what is left out
    overrides["rope_parameters"] = None
    if spec.mlx_rope == "gemma3":
        overrides["rope_local_base_freq"] = float(params["sliding"]["rope_theta"])
    if spec.mlx_rope == "phi3":
        params = config.get("rope_parameters") or {}
        overrides["partial_rotary_factor"] = float(params.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)


def _context_limit(family: str, config: Mapping[str, Any], ropes: list[Rope | None]) -> tuple[int | None, str]:
    """The longest sequence both backends compute alike where no patch makes them agree beyond it."""
    if any(r is not None and r.kind == "dynamic" for r in ropes):
        max_pos = int(config["max_position_embeddings"])
        return max_pos, (f"{family} uses dynamic RoPE scaling: past max_position_embeddings = {max_pos} the base grows "
                         "with the length, and transformers keeps the longest length it has seen while mlx-lm uses "
                         "each sequence's own, so the backends differ")
    return None, ""


def check_context(config_or_plan: Mapping[str, Any] | MlxPlan, max_seq_length: int) -> None:
    """Refuse `data.max_seq_length` beyond what MLX computes as transformers does for this model."""
    p = config_or_plan if isinstance(config_or_plan, MlxPlan) else plan(config_or_plan)
    if p.context_limit is not None and max_seq_length > p.context_limit:
        raise FtkitError(f"data.max_seq_length = {max_seq_length} on the MLX backend: {p.limit_reason}. "
                         f"Set data.max_seq_length <= {p.context_limit}, or {TO_TORCH}.")


def translate(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config mlx-lm reads: config.json with the plan's keys on top (the patches still apply)."""
    return {**config, **plan(config).overrides}
