"""GGUF -> Hugging Face folder, through transformers' GGUF loader, with the metadata it drops put back."""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ftkit.common.errors import FtkitError


def _gguf_metadata(path: Path) -> tuple[dict[str, Any], set[str]]:
    """The file's scalar metadata (arrays left out: the vocabulary is large) and its tensor names."""
    from gguf import GGUFReader, GGUFValueType  # lazy: optional extra

    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        if hasattr(field, "contents"):
            meta[key] = field.contents()
        else:  # gguf < 0.11 has no contents()
            part = field.parts[field.data[0]]
            meta[key] = bytes(part).decode() if field.types[0] == GGUFValueType.STRING else part.tolist()[0]
    return meta, {t.name for t in reader.tensors}


@contextmanager
def _as_gguf_file(source: Path) -> Iterator[tuple[Path, str]]:
    """(folder, file name) for transformers, which wants a name ending in .gguf; Ollama's blobs have none."""
    if source.suffix.lower() == ".gguf":
        yield source.parent, source.name
        return
    with tempfile.TemporaryDirectory(prefix="ftkit-gguf-") as d:
        link = Path(d) / "model.gguf"
        try:
            link.symlink_to(source)
        except OSError:
            shutil.copyfile(source, link)
        yield Path(d), link.name


def _gguf_load_kwargs(torch_dtype: Any) -> dict[str, Any]:

    import transformers  # lazy: slow to import
    from packaging.version import Version  # lazy: with transformers

    kwargs: dict[str, Any] = {}
    # transformers renamed torch_dtype to dtype in 4.56 and warns on the old name since.
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs[key] = torch_dtype
    # transformers 5 can keep GGUF weights packed in their blocks; a folder for training needs plain ones.
    config_cls = getattr(transformers, "GgufConfig", None)
    if config_cls is not None and "dequantize" in inspect.signature(config_cls.__init__).parameters:
        kwargs["quantization_config"] = config_cls(dequantize=True)
    return kwargs


def convert_gguf(source: Path, dest: Path, dtype: str, note: Callable[[str], None]) -> list[str]:
    import torch  # lazy: torch is a backend's
    import transformers  # lazy: slow to import
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: slow to import

    note(f"reading {source.name}")
    try:
        meta, tensors = _gguf_metadata(source)
    except ImportError as e:
        raise FtkitError("Converting a GGUF needs the gguf package: pip install 'gguf>=0.10'.") from e
    except (ValueError, KeyError, IndexError) as e:
        raise FtkitError(f"{source}: not a readable GGUF file ({e}).") from e
    note(f"dequantizing {source.name} to {dtype} (once; the result is cached)")
    try:
        with _as_gguf_file(source) as (folder, name):
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, **_gguf_load_kwargs(getattr(torch, dtype))
            )
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError, ImportError, RuntimeError) as e:
        arch = meta.get("general.architecture", "?")
        raise FtkitError(
            f"{source.name}: transformers {transformers.__version__} cannot load this GGUF "
            f"(architecture {arch!r}): {e}"
        ) from e
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # older transformers keep it on a dequantized model, and then refuse to save
        quantizer.remove_quantization_config(model)

    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length")
    if context and (tok.model_max_length is None or tok.model_max_length > 10**9):
        tok.model_max_length = int(context)
    fixes = []
    gguf_eos = meta.get("tokenizer.ggml.eos_token_id")
    if gguf_eos is not None and tok.eos_token_id != int(gguf_eos):
        # Seen with transformers 5.17: the tokenizer came back with BOS as its EOS. The GGUF is the truth,
        # and a wrong EOS would end every training example with the wrong token.
        fixes.append(f"tokenizer eos_token {tok.eos_token!r} -> {tok.convert_ids_to_tokens(int(gguf_eos))!r}")
        tok.eos_token = tok.convert_ids_to_tokens(int(gguf_eos))
    gguf_bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and gguf_bos is not None and tok("a").input_ids[:1] != [int(gguf_bos)]:
        # Also seen with transformers 5.17: the GGUF asks for a BOS and the tokenizer does not add it.
        try:
            tok.add_bos_token = True
        except AttributeError:
            pass
        if tok("a").input_ids[:1] == [int(gguf_bos)]:
            fixes.append("tokenizer add_bos_token set to True (as the GGUF says)")
    note("writing the Hugging Face folder")
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return fixes + _fix_gguf_folder(dest, meta, tensors, tok)


def _fix_gguf_folder(dest: Path, meta: dict[str, Any], tensors: set[str], tok: Any) -> list[str]:
    """Make config.json and generation_config.json say what the GGUF says; return what was changed."""
    fixes: list[str] = []
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    arch = meta.get("general.architecture")

    base = meta.get(f"{arch}.rope.freq_base")
    if base is not None:
        fixes += set_rope_theta(cfg, float(base))


    saved: set[str] = set()
    for shard in dest.glob("*.safetensors"):
        with safe_open(str(shard), framework="numpy") as f:
            saved |= set(f.keys())
    has_head = any(k.endswith("lm_head.weight") for k in saved)
    if "output.weight" in tensors and not has_head:
        raise FtkitError(
            "the converted model lost the GGUF's output matrix (output.weight): transformers tied it to the "
            "embeddings. Report this with the GGUF's name."
        )
    if cfg.get("tie_word_embeddings") != (not has_head):
        # With no lm_head saved, an untied loader would start the output layer from random weights.
        cfg["tie_word_embeddings"] = not has_head
        fixes.append(f"tie_word_embeddings set to {not has_head}")

    # Chat models end a turn with an end-of-turn token that llama.cpp keeps apart from EOS; generation
    # has to stop on either.
    stops: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in stops:
            stops.append(int(value))
    if tok.eos_token_id is not None and tok.eos_token_id not in stops:
        stops.insert(0, tok.eos_token_id)
    if stops and cfg.get("eos_token_id") is None:
        cfg["eos_token_id"] = stops[0]
        fixes.append(f"config eos_token_id set to {stops[0]}")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    gen_path = dest / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    have = gen.get("eos_token_id")
    have = [] if have is None else list(have) if isinstance(have, list) else [have]
    missing = [s for s in stops if s not in have]
    if missing:
        merged = have + missing
        gen["eos_token_id"] = merged[0] if len(merged) == 1 else merged
        fixes.append(f"generation eos_token_id set to {gen['eos_token_id']}")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if bos is not None and gen.get("bos_token_id") is None:
        gen["bos_token_id"] = int(bos)
    gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return fixes


def set_rope_theta(cfg: dict[str, Any], theta: float) -> list[str]:
    """Put the RoPE base where every reader looks for it.

    transformers 5 writes it only inside `rope_parameters`; transformers 4 and mlx-lm's llama read the
    top-level `rope_theta` and fall back to 10000 without a word, which quietly ruins a model trained
    with another base (SmolLM2: 100000).
    """
    fixes = []
    if cfg.get("rope_theta") != theta:
        fixes.append(f"rope_theta {cfg.get('rope_theta')} -> {theta}")
        cfg["rope_theta"] = theta
    params = cfg.get("rope_parameters")
    # A dict of dicts is per layer type (sliding vs full attention); its bases are not one number.
    if isinstance(params, dict) and not any(isinstance(v, dict) for v in params.values()):
        if params.get("rope_theta") != theta:
            fixes.append(f"rope_parameters.rope_theta {params.get('rope_theta')} -> {theta}")
            params["rope_theta"] = theta
    return fixes
