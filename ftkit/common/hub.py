"""The Hugging Face hub, once: what counts as a hub id, and the one snapshot download.

huggingface_hub takes the token from HF_TOKEN or `hf auth login` and the address from HF_ENDPOINT;
ftkit never sees a token.
"""

from __future__ import annotations

import re
from pathlib import Path

from ftkit.common.errors import FtkitError

# What a model or adapter repository needs; pickled weights and anything else stay on the hub.
PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.md"]
# The hub's own rule for `org/name`: letters, digits, '-', '_' and '.', no spaces, one slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A name ending in one of these is a file someone meant to point at, not a repository ("data/trian.jsonl").
# Repository names have dots too ("Qwen/Qwen2.5-0.5B"), so only these endings count.
FILE_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".toml", ".yaml", ".yml",
                   ".gguf", ".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".npz", ".model", ".zip", ".gz", ".tar")


def looks_like_hub_id(value: str, base: Path | None = None) -> bool:
    """`org/name` as the hub spells repository ids. Never a hub id: a local path like './x/y', '/x' or
    '~/x'; a name with a file extension ('data/trian.jsonl'); a name whose first part is an existing
    folder (of `base`, else the working directory): 'data/wikisq' beside a data/ folder is a typo."""
    if not _HUB_ID.match(value) or value.startswith((".", "/", "~")):
        return False
    if value.lower().endswith(FILE_EXTENSIONS):
        return False
    return not (Path(base or ".") / value.split("/", 1)[0]).is_dir()


def looks_like_repo(value: str, base: Path | None = None) -> bool:
    """A hub id that is not also an existing local path (a local folder wins)."""
    return looks_like_hub_id(value, base) and not Path(value).expanduser().exists()


def snapshot(repo_id: str, revision: str | None = None, what: str = "adapter", need_weights: bool = False) -> Path:
    """A local folder with the repository's files (downloaded once, then huggingface_hub's cache)."""
    from huggingface_hub import snapshot_download  # only when a hub id is used

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, bad revision: one sentence for the user
        raise FtkitError(f"{repo_id}: not a local {what} folder, and downloading it from the Hugging Face hub failed: {e}") from e
    if need_weights and not any(folder.glob("*.safetensors")):
        raise FtkitError(
            f"{repo_id}: the hub repository has no .safetensors weights; ftkit does not load pickled "
            f"(.bin/.pt) weights. Convert them to safetensors, or use a repository that has them."
        )
    return folder
