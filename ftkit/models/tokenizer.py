"""Loading a model's tokenizer."""

from __future__ import annotations

from pathlib import Path

from ftkit.common.errors import FtkitError

# The files a tokenizer loads from (fast tokenizers, sentencepiece, BPE vocabularies, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer_config.json")


def load_tokenizer(model_path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer  # lazy: slow to import

    folder = Path(model_path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise FtkitError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer_config.json, or tokenizer.model ...) beside "
                         "the weights; copy them from the model's original repository into this folder.")
    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError ... for a folder it cannot read
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FtkitError(f"{folder}: its tokenizer does not load ({first[:300]}). Check the tokenizer files there "
                         "(tokenizer.json, tokenizer_config.json), or copy them again from the model's repository.") from None
    if tok.pad_token_id is None:
        # Padding positions are masked out of the loss and attention, so any id will do.
        tok.pad_token = tok.eos_token
    return tok
