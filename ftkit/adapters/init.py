"""Initial adapter values, drawn in the core so that both backends start from the same numbers.

Each library has its own generator (torch's, MLX's), so the same seed would give two different
adapters. ftkit redraws them here with numpy, keyed by (seed, tensor name): the draw does not depend
on module order or on which backend asks.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np

from ftkit.common.errors import FtkitError
from ftkit.recipe.schema import MethodSection


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def prompt_init_ids(method: MethodSection, tokenizer, seed: int) -> list[int]:
    """Token ids whose embeddings start the soft prompt: the init text (repeated to length, as PEFT
    does), or tokens sampled from the vocabulary (PEFT's SAMPLE_VOCAB), which starts the prompt at the
    scale of real embeddings rather than at N(0, 1)."""
    n = method.num_virtual_tokens
    if method.prompt_init_text:
        ids = tokenizer(method.prompt_init_text, add_special_tokens=False).input_ids
        if not ids:
            raise FtkitError(f"method.prompt_init_text = {method.prompt_init_text!r} tokenizes to nothing; give some text or leave it unset.")
        return (ids * math.ceil(n / len(ids)))[:n]
    return [int(i) for i in _rng(seed, "prompt_embeddings").integers(0, len(tokenizer), size=n)]


def draw(tensors: dict[str, np.ndarray], seed: int, prompt_rows: Callable[[], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """New values for an adapter given in the common (PEFT) layout.

    LoRA A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform with a = sqrt(5), and mlx-lm's
    bound), B = 0 so training starts at the base model; a DoRA magnitude is the base weight's row norm,
    which both backends compute the same, so it is kept; a soft prompt takes `prompt_rows()`; a
    prefix (no `prompt_rows`) is drawn from N(0, 1).
    """
    out = {}
    for name, value in tensors.items():
        if name.endswith("lora_A.weight"):
            bound = 1.0 / math.sqrt(value.shape[1])
            out[name] = _rng(seed, name).uniform(-bound, bound, size=value.shape).astype(np.float32)
        elif name.endswith("lora_B.weight"):
            out[name] = np.zeros(value.shape, np.float32)
        elif name == "prompt_embeddings" and prompt_rows is not None:
            out[name] = np.asarray(prompt_rows(), np.float32).reshape(value.shape)
        elif name == "prompt_embeddings":  # a prefix: keys and values for every layer, N(0, 1) as PEFT draws them
            out[name] = _rng(seed, name).standard_normal(value.shape).astype(np.float32)
        else:
            out[name] = value
    return out
