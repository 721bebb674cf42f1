"""Which linear layers a recipe adapts, decided once for both backends from the model's module paths."""

from __future__ import annotations

import re

from ftkit.common.errors import FtkitError
from ftkit.recipe.schema import MethodSection

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def block_index(path: str) -> int | None:
    match = _BLOCK.search(path)
    return int(match.group(1)) if match else None


def select(linear_paths: list[str], method: MethodSection, num_layers: int) -> list[str]:
    """The module paths to adapt: "all-linear" is every linear layer inside a decoder block (the
    output head stays as it is, as in PEFT); a list names leaves ("q_proj") or dotted suffixes
    ("self_attn.q_proj"); method.layers keeps the last N blocks."""
    in_blocks = [p for p in linear_paths if block_index(p) is not None]
    if method.targets == "all-linear":
        chosen = in_blocks
    else:
        names = [method.targets] if isinstance(method.targets, str) else list(method.targets)
        chosen = [p for p in linear_paths if any(p == t or p.endswith("." + t) for t in names)]
        unmatched = [t for t in names if not any(p == t or p.endswith("." + t) for p in linear_paths)]
        if unmatched:
            leaves = sorted({p.rsplit(".", 1)[-1] for p in in_blocks})
            raise FtkitError(
                f"method.targets: {unmatched} match no linear layer of this model; its linear layers are {leaves} "
                '(or use "all-linear").'
            )
    if method.layers is not None:
        first = max(0, num_layers - method.layers)
        chosen = [p for p in chosen if (block_index(p) or 0) >= first]
    if not chosen:
        raise FtkitError(f"method.targets = {method.targets!r} with method.layers = {method.layers} selects no layer.")
    return sorted(chosen)
