"""Loading a model's tokenizer."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer  # lazy: slow to import

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions are masked out of the loss and attention, so any id will do.
        tok.pad_token = tok.eos_token
    return tok
