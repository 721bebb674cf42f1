"""Which layers a recipe adapts, decided once for both backends from the model's module paths.

The paths are the Hugging Face (transformers 5) names both backends report: linear layers by module
path, and the routed experts of a mixture-of-experts block by parameter path
(`model.layers.0.mlp.experts.gate_up_proj`: transformers keeps each block's experts as 3-D
parameters, and PEFT adapts them through `target_parameters`). Routers are never adapted: on torch a
router is not an `nn.Linear`, on MLX it is, so adapting it on one backend would give an adapter the
other cannot hold.
"""

from __future__ import annotations

import re

from ftkit.common.console import console
from ftkit.common.distributed import current
from ftkit.common.errors import FtkitError
from ftkit.recipe.schema import MethodSection

ALL_LINEAR = "all-linear"

# transformers 5's expert parameters in the order its MoE blocks register them: PEFT nests one
# wrapper per targeted parameter in this order, which decides the adapter's tensor names.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")

# A MoE block's router is a linear layer named `gate` (mlx-lm, and transformers before 5) or `router`.
_ROUTERS = ("gate", "router")

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def block_index(path: str) -> int | None:
    match = _BLOCK.search(path)
    return int(match.group(1)) if match else None


def leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def is_expert(path: str) -> bool:
    """A routed-experts parameter (`...experts.gate_up_proj`), not a linear layer."""
    parts = path.split(".")
    return len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in EXPERT_PARAMS


def is_router(path: str) -> bool:
    return leaf(path) in _ROUTERS


def _matches(path: str, target: str) -> bool:
    """A target names a linear layer by leaf or dotted suffix ("q_proj", "self_attn.q_proj"); experts only
    with "experts" in the name ("experts", "experts.down_proj"), so that "down_proj" keeps meaning the
    linear layers it means in PEFT's target_modules."""
    if not is_expert(path):
        return path == target or path.endswith("." + target)
    if "experts" not in target.split("."):
        return False
    module = path.rsplit(".", 1)[0]
    return any(p == target or p.endswith("." + target) for p in (path, module))


def _names(method: MethodSection) -> list[str]:
    return [method.targets] if isinstance(method.targets, str) else list(method.targets)


def _by_name(candidates: list[str], in_blocks: list[str], names: list[str]) -> list[str]:
    chosen = {p for p in in_blocks if not is_expert(p)} if ALL_LINEAR in names else set()
    names = [t for t in names if t != ALL_LINEAR]
    chosen |= {p for p in candidates if any(_matches(p, t) for t in names)}
    unmatched = [t for t in names if not any(_matches(p, t) for p in candidates)]
    if unmatched:
        leaves = sorted({leaf(p) for p in in_blocks if not is_expert(p)} | ({"experts"} if any(map(is_expert, in_blocks)) else set()))
        raise FtkitError(
            f"method.targets: {unmatched} match no linear layer of this model; its linear layers are {leaves} "
            f'(or use "{ALL_LINEAR}"; "experts" names a mixture-of-experts block\'s routed experts; routers are never adapted).'
        )
    return sorted(chosen)


def _check_experts(chosen: list[str], method: MethodSection) -> None:
    """PEFT adapts expert parameters with plain LoRA only; refuse here, the same on both backends."""
    if not any(map(is_expert, chosen)):
        return
    if method.kind == "dora":
        raise FtkitError("method.kind = 'dora' with MoE experts in method.targets: PEFT has no DoRA for expert parameters; "
                         "use method.kind = 'lora', or leave \"experts\" out of method.targets.")
    if method.dropout:
        raise FtkitError(f"method.dropout = {method.dropout} with MoE experts in method.targets: PEFT's LoRA on expert "
                         "parameters has no dropout; set method.dropout = 0, or leave \"experts\" out of method.targets.")


def select(linear_paths: list[str], method: MethodSection, num_layers: int) -> list[str]:
    """The paths to adapt: "all-linear" is every linear layer inside a decoder block but the routers
    (the output head stays as it is, as in PEFT), and not a MoE block's routed experts; a list names
    leaves ("q_proj"), dotted suffixes ("self_attn.q_proj"), "experts", or "all-linear" plus more;
    method.layers keeps the last N blocks."""
    candidates = [p for p in linear_paths if not is_router(p)]
    in_blocks = [p for p in candidates if block_index(p) is not None]
    chosen = _by_name(candidates, in_blocks, _names(method))
    if method.layers is not None:
        if method.layers > num_layers:
            raise FtkitError(f"method.layers = {method.layers}, but this model has {num_layers} decoder blocks; "
                             "set at most that, or leave method.layers out to adapt every block.")
        first = max(0, num_layers - method.layers)
        chosen = [p for p in chosen if (block_index(p) or 0) >= first]
    if not chosen:
        raise FtkitError(f"method.targets = {method.targets!r} with method.layers = {method.layers} selects no layer.")
    _check_experts(chosen, method)
    if ALL_LINEAR in _names(method):
        _note_moe(chosen, in_blocks)
    return chosen


def _group(path: str) -> str:
    if is_expert(path):
        return "experts"
    if "shared_expert" in path:
        return "shared experts"
    return "attention" if "attn" in path else "other"


def describe(chosen: list[str], candidates: list[str]) -> str | None:
    """What "all-linear" adapted on a mixture-of-experts model, in a sentence; None for a dense model."""
    if not any(map(is_expert, candidates)):
        return None
    groups: dict[str, set[str]] = {}
    for p in chosen:
        groups.setdefault(_group(p), set()).add(leaf(p))
    parts = [f"{g} ({', '.join(sorted(groups[g]))})" for g in ("attention", "shared experts", "experts", "other") if g in groups]
    blocks = len({block_index(p) for p in chosen})
    text = f'method.targets "all-linear" on this mixture-of-experts model adapts {"; ".join(parts)} in {blocks} block(s); not the routers'
    if "experts" not in groups:
        text += ', nor the routed experts: ["all-linear", "experts"] adapts them too'
    return text + "."


def _note_moe(chosen: list[str], candidates: list[str]) -> None:
    text = describe(chosen, candidates)
    if text and current().is_main:
        console().print(f"[yellow]note:[/] {text}")
