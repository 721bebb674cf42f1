"""Turn a model neither backend loads directly into a Hugging Face folder both load, and find models.

Two sources are converted: a GGUF file (llama.cpp, Ollama; dequantized by transformers' GGUF loader)
and a llama2.c `.bin` checkpoint (read here, with its sentencepiece `.model` tokenizer). The result is
config.json + model.safetensors + tokenizer files.

Converting a GGUF takes tens of seconds, so a finished folder is reused: it holds `ftkit_convert.json`,
which names the source (size, mtime, a hash of its first and last MiB) and the dtype. The folder is
built under a temporary name and renamed into place with that file already inside, so a folder that
has the file is complete, and an interrupted conversion leaves only a temporary folder that is never
picked and is swept by the next conversion.

torch, transformers and gguf are imported inside the functions that need them: this module is part
of the core, which must import without a backend installed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftkit import __version__
from ftkit.checkpoint import atomic_dir
from ftkit.errors import FtkitError

MARKER = "ftkit_convert.json"
_ENDS = 1 << 20
_DTYPES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}  # fmt: skip
# A GGUF is mostly 4-8 bit blocks, which bfloat16 holds with room to spare at half float32's size;
# a llama2.c checkpoint is float32 and small enough to keep exact.
_AUTO_DTYPE = {"gguf": "bfloat16", "llama2c": "float32"}
_LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c's versioned exports, whose layout differs from v0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

Progress = Callable[[str], None]


def cache_root() -> Path:
    return Path(os.environ.get("FTKIT_CACHE") or Path.home() / ".cache" / "ftkit").expanduser()


def resolve_model(path: str, revision: str | None = None) -> Path:
    """The local folder a model loads from: a folder as is (or, when it has no config.json but one
    .gguf, that file converted), a .gguf or llama2.c .bin converted (once; cached), a hub id
    `org/name` downloaded (config, tokenizer and safetensors files)."""
    local = Path(path).expanduser()
    if local.is_dir():
        ggufs = sorted(local.glob("*.gguf"))
        if not (local / "config.json").exists() and len(ggufs) == 1:
            return convert(ggufs[0])
        return local
    if local.is_file():
        if _source_kind(local) is None:
            raise FtkitError(
                f"{path}: ftkit loads a Hugging Face model folder, a .gguf file or a llama2.c .bin "
                f"checkpoint; this file is none of those."
            )
        return convert(local)
    if not _HUB_ID.match(path):
        raise FtkitError(f"{path}: no such file or folder, and not a Hugging Face hub id (org/name).")
    return _download(path, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, bad revision: all mean the same to the user
        raise FtkitError(
            f"{repo_id}: not a local file or folder, and downloading it from the Hugging Face hub failed: {e}"
        ) from e
    if not any(folder.glob("*.safetensors")):
        raise FtkitError(
            f"{repo_id}: the hub repository has no .safetensors weights; ftkit does not load pickled "
            f"(.bin/.pt) weights. Convert them to safetensors, or use a repository that has them."
        )
    return folder


def convert(
    src: str | Path,
    out: Path | None = None,
    *,
    dtype: str = "auto",
    force: bool = False,
    tokenizer: str | Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Convert a .gguf file or a llama2.c .bin checkpoint into a Hugging Face folder; return the folder.

    out: the folder to write; None means ftkit's cache ($FTKIT_CACHE or ~/.cache/ftkit), under
        converted/<stem>-<hash of the source's path, size, mtime and the dtype>.
    dtype: bfloat16 | float16 | float32 | auto (bfloat16 for a GGUF, float32 for llama2.c).
    force: convert again even when `out` already holds this conversion.
    tokenizer: the sentencepiece .model of a llama2.c checkpoint; by default the one beside it.
    progress: called with a short line before each slow stage.
    """
    if dtype != "auto" and dtype not in _DTYPES:
        raise FtkitError(f"dtype {dtype!r}: expected one of bfloat16, float16, float32, auto.")
    source = Path(src).expanduser().resolve()
    if not source.is_file():
        raise FtkitError(f"{src}: no such file.")
    kind = _source_kind(source)
    if kind is None:
        raise FtkitError(f"{src}: not a GGUF file or a llama2.c .bin checkpoint, so ftkit cannot convert it.")
    tok_file = None
    if kind == "llama2c":
        _llama2c_layout(source)  # a wrong file should say so, not ask for a tokenizer
        tok_file = _find_tokenizer(source, tokenizer)
    resolved_dtype = _resolve_dtype(dtype, kind)
    expect: dict[str, Any] = {
        "format": kind,
        "source": _source_id(source),
        "tokenizer": _source_id(tok_file) if tok_file else None,
        "dtype": resolved_dtype,
    }
    dest = Path(out).expanduser().resolve() if out is not None else _cache_dir(source, tok_file, resolved_dtype)
    if not force and _is_complete(dest, expect):
        return dest
    if dest.exists() and not dest.is_dir():
        raise FtkitError(f"{dest}: exists and is not a folder; choose another output folder.")
    if dest.is_dir() and not (dest / MARKER).exists() and any(dest.iterdir()):
        # Only a folder ftkit converted (or an empty one) is replaced, force or not: it may be the user's.
        raise FtkitError(f"{dest}: exists and is not a folder ftkit converted; choose another output folder.")

    note = progress or (lambda _line: None)
    _sweep_leftovers(dest)
    try:
        with atomic_dir(dest) as tmp:
            if kind == "gguf":
                fixes = _convert_gguf(source, tmp, resolved_dtype, note)
            else:
                assert tok_file is not None
                fixes = _convert_llama2c(source, tok_file, tmp, resolved_dtype, note)
            record = dict(expect, ftkit_version=__version__, fixes=fixes)
            # Written last, so only a folder with every other file in it has one.
            (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    except OSError:
        # Another process converting the same source may have renamed its folder into place first.
        if not force and _is_complete(dest, expect):
            return dest
        raise
    return dest


# --- what a source is, and whether a folder already holds its conversion ---


def _source_kind(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return "gguf"
    if path.suffix.lower() == ".bin" and len(head) == 4:
        return "llama2c"
    return None


def _source_id(path: Path) -> dict[str, Any]:
    """Enough to tell a changed file from the same one, without reading gigabytes."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_ENDS))
        if st.st_size > _ENDS:
            f.seek(max(_ENDS, st.st_size - _ENDS))
            digest.update(f.read())
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": digest.hexdigest()}


def _same_file(a: dict | None, b: dict | None) -> bool:
    # The path is left out on purpose: a moved file (same size, mtime and bytes) is the same source.
    if a is None or b is None:
        return a is b
    return all(a.get(k) == b.get(k) for k in ("size", "mtime_ns", "sha256_ends"))


def _is_complete(folder: Path, expect: dict[str, Any]) -> bool:
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("format") == expect["format"]
        and record.get("dtype") == expect["dtype"]
        and _same_file(record.get("source"), expect["source"])
        and _same_file(record.get("tokenizer"), expect["tokenizer"])
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def _cache_dir(source: Path, tok_file: Path | None, dtype: str) -> Path:
    st = source.stat()
    key = [str(source), st.st_size, st.st_mtime_ns, dtype, str(tok_file) if tok_file else None]
    short = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.-]+", "_", source.stem)[:64] or "model"
    return cache_root() / "converted" / f"{stem}-{short}"


def _sweep_leftovers(dest: Path) -> None:
    """Remove temporary siblings that crashed conversions left, so they do not pile up in the cache.

    The names are checkpoint.atomic_dir's: `.<name>.tmp-<pid>` and `.<name>.old-<pid>`.
    """
    if not dest.parent.is_dir():
        return
    for p in dest.parent.iterdir():
        for tag in (".tmp-", ".old-"):
            prefix = f".{dest.name}{tag}"
            if p.name.startswith(prefix) and p.name[len(prefix):].isdigit():
                pid = int(p.name[len(prefix):])
                if pid != os.getpid() and not _alive(pid):
                    shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # there os.kill(pid, 0) terminates the process instead of probing it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _resolve_dtype(dtype: str, kind: str) -> str:
    return _AUTO_DTYPE[kind] if dtype == "auto" else _DTYPES[dtype]


def _find_tokenizer(source: Path, given: str | Path | None) -> Path:
    if given is not None:
        tok = Path(given).expanduser().resolve()
        if not tok.is_file():
            raise FtkitError(f"{given}: no such tokenizer file.")
        return tok
    for name in (f"{source.stem}.model", "tokenizer.model"):
        if (source.parent / name).is_file():
            return source.parent / name
    found = sorted(source.parent.glob("*.model"))
    if len(found) == 1:
        return found[0]
    what = "none" if not found else ", ".join(p.name for p in found)
    raise FtkitError(
        f"{source}: a llama2.c checkpoint needs its sentencepiece tokenizer (.model) file; found {what} "
        f"beside it. Pass it with tokenizer=..."
    )


# --- GGUF ---


def _gguf_metadata(path: Path) -> tuple[dict[str, Any], set[str]]:
    """The file's scalar metadata (arrays left out: the vocabulary is large) and its tensor names."""
    from gguf import GGUFReader, GGUFValueType

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
    import inspect

    import transformers
    from packaging.version import Version

    kwargs: dict[str, Any] = {}
    # transformers renamed torch_dtype to dtype in 4.56 and warns on the old name since.
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs[key] = torch_dtype
    # transformers 5 can keep GGUF weights packed in their blocks; a folder for training needs plain ones.
    config_cls = getattr(transformers, "GgufConfig", None)
    if config_cls is not None and "dequantize" in inspect.signature(config_cls.__init__).parameters:
        kwargs["quantization_config"] = config_cls(dequantize=True)
    return kwargs


def _convert_gguf(source: Path, dest: Path, dtype: str, note: Progress) -> list[str]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        fixes += _set_rope_theta(cfg, float(base))

    from safetensors import safe_open

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


def _set_rope_theta(cfg: dict[str, Any], theta: float) -> list[str]:
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


# --- llama2.c ---


def _llama2c_layout(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...]]]]:
    """The header and the array shapes of a llama2.c legacy (version 0) checkpoint; checks the file size.

    Layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then
    float32 arrays in llama2.c export.py's `legacy_export` order; a negative vocab_size means a
    separate classifier follows at the end, a positive one that it is tied to the embedding.
    """
    with open(path, "rb") as f:
        raw = f.read(28)
    size = path.stat().st_size
    if len(raw) < 28:
        raise FtkitError(f"{path}: too short to be a llama2.c checkpoint.")
    if struct.unpack_from("<I", raw)[0] == _LLAMA2C_MAGIC:
        raise FtkitError(
            f"{path}: a versioned llama2.c export; ftkit reads the legacy one. Re-export it with "
            f"llama2.c's `python export.py out.bin --version 0 --checkpoint ...`."
        )
    fields = struct.unpack_from("<7i", raw)
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = fields
    shared = vocab > 0
    vocab = abs(vocab)
    sane = (
        min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) > 0
        and dim % heads == 0
        and heads % kv_heads == 0
        and (dim // heads) % 2 == 0
    )
    if not sane:
        raise FtkitError(f"{path}: not a llama2.c checkpoint (its header would be {fields}).")
    head = dim // heads
    kv_dim = kv_heads * head
    shapes = [
        ("embed", (vocab, dim)),
        ("attn_norm", (layers, dim)),
        ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)),
        ("ffn_norm", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cos", (seq_len, head // 2)),
        ("freq_sin", (seq_len, head // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    expected = 28 + 4 * sum(math.prod(shape) for _, shape in shapes)
    if size != expected:
        raise FtkitError(
            f"{path}: {size} bytes, but a llama2.c checkpoint with the header it would have is {expected}; "
            f"not a llama2.c .bin. (A PyTorch .bin loads from its Hugging Face folder instead.)"
        )
    header = dict(dim=dim, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, seq_len=seq_len, shared=shared)
    return header, shapes


def _read_llama2c(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np

    header, shapes = _llama2c_layout(path)
    count = sum(math.prod(shape) for _, shape in shapes)
    flat = np.fromfile(path, dtype="<f4", offset=28, count=count)
    arrays, at = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        arrays[name] = flat[at : at + n].reshape(shape)
        at += n
    return header, arrays


def _interleaved_to_halves(w: Any, n_heads: int) -> Any:
    """Reorder q/k rows from RoPE on adjacent pairs (x[2i], x[2i+1]) -- llama2.c, Meta, GGUF -- to
    transformers' rotate-half pairs (x[i], x[i + head/2]); the `permute` of convert_llama_weights_to_hf.py."""
    out_features, in_features = w.shape
    half = out_features // n_heads // 2
    return w.reshape(n_heads, half, 2, in_features).transpose(0, 2, 1, 3).reshape(out_features, in_features)


def _rope_theta_of(freq_cos: Any, freq_sin: Any, head: int) -> float:
    """The RoPE base the checkpoint's cos/sin tables were built with.

    llama2.c trains with 10000, but a fork may not, and a wrong base would go unnoticed: the model
    would load and run, only worse. The tables the file carries settle it.
    """
    import numpy as np

    half = head // 2
    if half < 2 or freq_cos.shape[0] < 2:
        return 10000.0
    # At position 1 the angle of pair i is theta ** (-2i / head); the last pair pins theta best.
    angle = float(np.arctan2(freq_sin[1, half - 1], freq_cos[1, half - 1]))
    if not angle > 0:
        raise FtkitError("the checkpoint's RoPE tables are not RoPE tables; is this a llama2.c checkpoint?")
    estimate = angle ** (-head / (2 * (half - 1)))
    positions = np.arange(freq_cos.shape[0], dtype=np.float64)[:, None]
    for theta in (float(f"{estimate:.4g}"), estimate):
        angles = positions * theta ** (-2 * np.arange(half) / head)
        if np.allclose(np.cos(angles), freq_cos, atol=1e-3) and np.allclose(np.sin(angles), freq_sin, atol=1e-3):
            return theta
    raise FtkitError("the checkpoint's RoPE tables match no RoPE base; is this a llama2.c checkpoint?")


def _convert_llama2c(source: Path, tok_file: Path, dest: Path, dtype: str, note: Progress) -> list[str]:
    import numpy as np
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    note(f"reading {source.name}")
    h, a = _read_llama2c(source)
    theta = _rope_theta_of(a["freq_cos"], a["freq_sin"], h["dim"] // h["heads"])

    # Tokenizer first: a checkpoint paired with the wrong tokenizer should fail before anything is written.
    shutil.copyfile(tok_file, dest / "tokenizer.model")
    tok_cls = getattr(transformers, "LlamaTokenizerFast", None) or transformers.LlamaTokenizer
    try:
        # llama2.c prepends BOS to every prompt and trained on text that way.
        tok = tok_cls.from_pretrained(dest, add_bos_token=True, add_eos_token=False)
    except (ImportError, ValueError, OSError) as e:
        raise FtkitError(
            f"{tok_file}: could not read it as a sentencepiece tokenizer ({e}). It needs the "
            f"sentencepiece and protobuf packages."
        ) from e
    if len(tok) != h["vocab"]:
        raise FtkitError(
            f"{tok_file} has {len(tok)} tokens, but {source.name} was trained with {h['vocab']}: "
            f"not its tokenizer. Pass the right one with tokenizer=..."
        )
    tok.model_max_length = h["seq_len"]
    tok.save_pretrained(dest)

    config = LlamaConfig(
        vocab_size=h["vocab"],
        hidden_size=h["dim"],
        intermediate_size=h["hidden"],
        num_hidden_layers=h["layers"],
        num_attention_heads=h["heads"],
        num_key_value_heads=h["kv_heads"],
        max_position_embeddings=h["seq_len"],
        rms_norm_eps=1e-5,  # llama2.c's RMSNorm hard-codes it
        rope_theta=theta,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=h["shared"],
        bos_token_id=1,  # sentencepiece's fixed ids, which llama2.c's run.c relies on
        eos_token_id=2,
        pad_token_id=None,
    )
    state = {"model.embed_tokens.weight": a["embed"], "model.norm.weight": a["norm"]}
    for i in range(h["layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = a["attn_norm"][i]
        state[p + "self_attn.q_proj.weight"] = _interleaved_to_halves(a["wq"][i], h["heads"])
        state[p + "self_attn.k_proj.weight"] = _interleaved_to_halves(a["wk"][i], h["kv_heads"])
        state[p + "self_attn.v_proj.weight"] = a["wv"][i]
        state[p + "self_attn.o_proj.weight"] = a["wo"][i]
        state[p + "post_attention_layernorm.weight"] = a["ffn_norm"][i]
        state[p + "mlp.gate_proj.weight"] = a["w1"][i]
        state[p + "mlp.down_proj.weight"] = a["w2"][i]
        state[p + "mlp.up_proj.weight"] = a["w3"][i]
    if not h["shared"]:
        state["lm_head.weight"] = a["wcls"]

    note("writing the Hugging Face folder")
    model = LlamaForCausalLM(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (h["shared"] and k == "lm_head.weight")]
    if missing or unexpected:  # a transformers whose Llama names weights differently
        raise FtkitError(f"llama2.c conversion: weights missing {missing}, unexpected {unexpected}.")
    model.to(getattr(torch, dtype)).save_pretrained(dest)

    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    _set_rope_theta(cfg, theta)  # not a fix: transformers 5 just keeps it where mlx-lm does not look
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return []


def quantize_mlx(src: Path, out: Path | None, bits: int, group_size: int = 64, force: bool = False) -> Path:
    """`src` (a model folder) quantized in MLX's format, for the MLX backend's QLoRA. Needs mlx."""
    import importlib

    from ftkit.backend import BACKENDS, installed
    from ftkit.errors import BackendUnavailable

    if bits not in (2, 3, 4, 5, 6, 8):
        raise FtkitError(f"--quantize {bits}: MLX quantizes to 2, 3, 4, 5, 6 or 8 bits.")
    if not installed("mlx"):
        raise BackendUnavailable(f"--quantize writes MLX's quantized format and needs the MLX backend: {BACKENDS['mlx'][3]}")
    if not (src / "config.json").exists():
        raise FtkitError(f"{src}: not a model folder (no config.json).")
    if out is None:
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.glob("*.safetensors"))
        short = hashlib.sha256(json.dumps([str(src.resolve()), files]).encode()).hexdigest()[:12]
        out = cache_root() / "quantized" / f"{src.name}-q{bits}g{group_size}-{short}"
    dest = Path(out).expanduser().resolve()
    if (dest / "config.json").exists() and not force:
        q = json.loads((dest / "config.json").read_text()).get("quantization") or {}
        if (q.get("bits"), q.get("group_size")) == (bits, group_size):
            return dest
        raise FtkitError(f"{dest}: already holds a model; pass --force to replace it, or choose another --out.")
    model_io = importlib.import_module("ftkit_mlx.model_io")
    with atomic_dir(dest) as tmp:
        model_io.quantize_folder(src, tmp, bits, group_size)
    return dest
