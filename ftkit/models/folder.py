"""What a model folder must hold before a backend loads it, and the limits it sets on a recipe.

A folder is checked once it is resolved (`resolve_model`): config.json that parses, weights that are
all there (each safetensors file as long as its header says, every shard an index names), so a failed
download reads as one sentence naming the file instead of a loader's MemoryError or reshape error.
Its config also says how many decoder layers the model has and how long a sequence it was built for:
`method.layers` is checked against the first before any weight is read (an error), the examples'
lengths and `data.max_seq_length` against the second once the data is tokenized (a warning:
ftkit.data.token_cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftkit.common.errors import FtkitError
from ftkit.common.tensors import check_whole

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"

# Where configs keep the layer count and the context length (GPT-2: n_layer, n_positions; Llama and most
# others: num_hidden_layers, max_position_embeddings; multimodal models: inside text_config).
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict, or an FtkitError naming the file and what is wrong with it."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FtkitError(f"{folder}: no {CONFIG}, so this is not a Hugging Face model folder. Point model.path (--model) "
                         "at the folder that holds config.json, the weights and the tokenizer files, a .gguf file, or a hub id.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FtkitError(f"{path}: not valid JSON ({e}); download or copy it again.") from None
    if not isinstance(config, dict):
        raise FtkitError(f"{path}: expected a JSON object (the model's configuration).")
    if "model_type" not in config and not config.get("architectures"):
        raise FtkitError(f"{path}: has no model_type, so no library can tell which model this is; "
                         "download or copy the model's own config.json again.")
    return config


def check_folder(folder: Path) -> dict[str, Any]:
    """Refuse a model folder a backend would fail on with a library's trace; return its config."""
    folder = Path(folder)
    config = read_config(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise FtkitError(f"{index}: not a readable safetensors index (JSON with a weight_map).") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FtkitError(f"{folder}: {len(missing)} of the {len(shards)} weight files {INDEX} names are missing "
                             f"({', '.join(missing[:3])}): an interrupted download? Download them again.")
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("pytorch_model*.bin")):
        raise FtkitError(f"{folder}: no model weights (model.safetensors, or shards with {INDEX}) beside {CONFIG}: "
                         "an interrupted download? Download the weights, or point model.path at the folder that has them.")
    for f in files:
        check_whole(f)
    return config


def _find(config: dict[str, Any], keys: tuple[str, ...]) -> tuple[int, str] | None:
    for scope, prefix in ((config, ""), (config.get("text_config") or {}, "text_config.")):
        if not isinstance(scope, dict):
            continue
        for key in keys:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"{prefix}{key}"
    return None


def layer_count(config: dict[str, Any]) -> tuple[int, str] | None:
    """(decoder layers, the config key that says so), or None when the config does not say."""
    return _find(config, _LAYER_KEYS)


def context_length(config: dict[str, Any]) -> tuple[int, str] | None:
    """(the longest sequence the model was built for, the config key that says so), or None."""
    return _find(config, _CONTEXT_KEYS)


def layers_problem(folder: Path, config: dict[str, Any], layers: int | None) -> str | None:
    """method.layers asks for more decoder blocks than the model has (it would silently adapt them all)."""
    found = layer_count(config)
    if layers is None or found is None or layers <= found[0]:
        return None
    n, key = found
    return (f"method.layers = {layers}, but {folder.name} has {n} layers ({folder / CONFIG}: {key} = {n}); set "
            f"method.layers to at most {n}, or leave it out to adapt every layer.")


def context_problem(folder: Path, config: dict[str, Any], max_seq_length: int, longer: dict[str, int],
                    explicit: bool = True) -> str | None:
    """data.max_seq_length beyond the positions the model was built for, in a sentence: with the examples
    that are longer than that ({split: how many} in `longer`), which are trained past the positions the
    model knows; or, where none is, that the recipe asks for more than the model takes. None where
    max_seq_length fits, or where it is the default and no example needs more."""
    found = context_length(config)
    if found is None or max_seq_length <= found[0]:
        return None
    n, key = found
    setting = f"data.max_seq_length = {max_seq_length}" if explicit else f"data.max_seq_length (not set: {max_seq_length}, the default)"
    takes = f"{folder.name}'s context of {n} tokens ({folder / CONFIG}: {key} = {n})"
    if any(longer.values()):
        counts = ", ".join(f"{v} {k}" for k, v in longer.items() if v)
        return (f"examples longer than {takes}: {counts}; {setting} lets them through, to be trained past the positions "
                f"the model was built for. Set data.max_seq_length = {n} (longer examples are then cut to it).")
    if not explicit:
        return None
    return (f"{setting} is longer than {takes}; no example is longer than {n}, so none is trained past it, but set "
            f"data.max_seq_length to at most {n}.")
