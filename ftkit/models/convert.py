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
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftkit import __version__
from ftkit.common.atomic import atomic_dir
from ftkit.common.errors import FtkitError
from ftkit.common.paths import cache_root
from ftkit.models.gguf import convert_gguf
from ftkit.models.llama2c import convert_llama2c, llama2c_layout

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


Progress = Callable[[str], None]


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
    kind = source_kind(source)
    if kind is None:
        raise FtkitError(f"{src}: not a GGUF file or a llama2.c .bin checkpoint, so ftkit cannot convert it.")
    tok_file = None
    if kind == "llama2c":
        llama2c_layout(source)  # a wrong file should say so, not ask for a tokenizer
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
                fixes = convert_gguf(source, tmp, resolved_dtype, note)
            else:
                assert tok_file is not None
                fixes = convert_llama2c(source, tok_file, tmp, resolved_dtype, note)
            record = dict(expect, ftkit_version=__version__, fixes=fixes)
            # Written last, so only a folder with every other file in it has one.
            (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    except OSError:
        # Another process converting the same source may have renamed its folder into place first.
        if not force and _is_complete(dest, expect):
            return dest
        raise
    return dest


def source_kind(path: Path) -> str | None:
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
