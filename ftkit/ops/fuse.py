"""Merge an adapter into its base model and write a plain Hugging Face model folder, checked to load whole."""

from __future__ import annotations

import json
from pathlib import Path

from ftkit.adapters import layout as adapter_layout
from ftkit.adapters import meta as adapter_format
from ftkit.adapters.resolve import resolve
from ftkit.common.atomic import atomic_dir
from ftkit.common.errors import FtkitError
from ftkit.common.fingerprints import fingerprint_model
from ftkit.common.tensors import read_header
from ftkit.evaluate.inference import open_model


def base_model_of(adapter: Path) -> str | None:
    """The base an adapter records: ftkit.json's, else PEFT's base_model_name_or_path."""
    meta = adapter_format.read_meta(adapter) or {}
    path = meta.get("base_model", {}).get("path")
    if path:
        return path
    return adapter_layout.read_config(adapter).get("base_model_name_or_path")


def fuse(adapter: Path, out: Path, *, model: str | None, backend_name: str, dequantize: bool, force: bool) -> dict:

    adapter = resolve(adapter)
    model = model or base_model_of(adapter)
    if not model:
        raise FtkitError(f"{adapter} does not record its base model; pass --model.")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FtkitError(f"{out} already exists and is not empty; pass --force to replace it, or choose another --out.")
    backend, tokenizer, model_path = open_model(model, backend_name, adapter)
    with atomic_dir(out) as tmp:
        backend.fuse(tmp, dequantize)
        tokenizer.save_pretrained(tmp)
        adapter_format.write_meta(tmp, {
            "backend": backend.name, "method": "fused",
            "fused_from": {"adapter": str(adapter), "adapter_meta": adapter_format.read_meta(adapter)},
            "base_model": {"path": model, "fingerprint": fingerprint_model(model_path)},
            "dequantized": dequantize,
        })
        check_model_folder(tmp)  # inside atomic_dir: a folder that fails leaves nothing under `out`
    return {"model": str(out), "backend": backend.name, "base_model": model, "adapter": str(adapter)}


def check_model_folder(folder: Path) -> None:
    """Refuse a written model folder that its reader would not take whole: transformers when torch is
    here (every weight the config's model holds, nothing it would ignore), else the names in the files.

    A missing weight is not an error in transformers, only a warning while it draws the weight at
    random; an unexpected one is dropped. So a fused folder that loads "fine" can be another model.
    """
    config = json.loads((folder / "config.json").read_text())
    if "quantization" in config or config.get("quantization_config"):
        _check_names(folder, config, mlx_layout="quantization" in config)  # MLX's or bitsandbytes' format: not a meta-device load
        return
    try:
        import torch  # noqa: F401
        from transformers import CONFIG_MAPPING
    except ImportError:
        _check_names(folder, config, mlx_layout=False)
        return
    if config.get("model_type") not in CONFIG_MAPPING:  # a family transformers has no class for (remote code)
        _check_names(folder, config, mlx_layout=False)
        return
    _check_with_transformers(folder)


def _check_with_transformers(folder: Path) -> None:
    """Load the folder's structure on the meta device (no weight is read) and ask for the key report."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()  # its own load report would print the same keys again
    try:
        _, info = AutoModelForCausalLM.from_pretrained(folder, device_map="meta", output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise FtkitError(f"the written model folder does not load in transformers: {str(e).splitlines()[0][:300]}") from None
    finally:
        logging.set_verbosity(before)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise FtkitError(_folder_problem(problems, "transformers"))


def _folder_problem(problems: dict[str, list], reader: str) -> str:
    said = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {', '.join(map(str, v[:3]))})" for k, v in problems.items() if v)
    return (f"the written model folder would not load whole in {reader}: {said}. Nothing was written; this is a bug in "
            "ftkit's writer for this model family: please report it with the model's config.json.")


def _weight_names(folder: Path) -> set[str]:
    """Every tensor name in the folder's safetensors files, checked against its index when it has one."""
    names: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        names |= set(read_header(f)[0])
    index = folder / "model.safetensors.index.json"
    if index.exists():
        mapped = json.loads(index.read_text()).get("weight_map", {})
        absent = sorted(set(mapped) ^ names) or sorted(f for f in set(mapped.values()) if not (folder / f).exists())
        if absent:
            raise FtkitError(_folder_problem({"index_entries_without_a_tensor": absent}, "any reader"))
    return names


def _check_names(folder: Path, config: dict, mlx_layout: bool) -> None:
    """Without transformers: the names the config implies (embeddings, each of its blocks, an untied
    head), and none of mlx-lm's own (stacked `switch_mlp` experts) where transformers is the reader."""
    names = _weight_names(folder)
    missing = [] if any("embed" in n for n in names) else ["*embed*"]
    if config.get("tie_word_embeddings") is False and "lm_head.weight" not in names:
        missing.append("lm_head.weight")
    missing += [f"*layers.{i}.*" for i in range(int(config.get("num_hidden_layers") or 0))
                if not any(f"layers.{i}." in n for n in names)]
    unexpected = [] if mlx_layout else sorted(n for n in names if ".switch_mlp." in n)
    if missing or unexpected:
        raise FtkitError(_folder_problem({"missing_keys": missing, "unexpected_keys": unexpected}, "its reader"))
