"""`ftkit export`: an adapter as a GGUF LoRA file for llama.cpp and Ollama, or a fused model as GGUF.

The LoRA file follows llama.cpp's convert_lora_to_gguf.py: general.type = "adapter", adapter.type =
"lora", adapter.lora.alpha (llama.cpp scales by alpha / rank), and for every adapted linear layer
`<gguf tensor name>.lora_a` with PEFT's A as it is (numpy (r, in), ggml ne = [in, r]) and `.lora_b`
with B (numpy (out, r)). Llama-family q/k rows are stored in GGUF's interleaved RoPE order, which
llama.cpp's converter reaches by permuting the HF rows; a LoRA on q_proj / k_proj gets the same
permutation of B's rows (W = B A, so permuting W's rows is permuting B's).

The fused model is written the same way llama.cpp's convert_hf_to_gguf.py writes a Llama-family model:
its hyperparameters, the byte-level BPE vocabulary and merges, special tokens and chat template, and
each weight in f32 / f16 / bf16 / q8_0 (norms stay f32). Both files are read back with gguf's reader
before the command says done.

The `gguf` package (llama.cpp's own gguf-py) does the writing, the quantization and the reading.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ftkit.adapters import layout as adapter_layout
from ftkit.adapters import meta as adapter_format
from ftkit.adapters.resolve import resolve
from ftkit.common.errors import FtkitError
from ftkit.common.tensors import read_safetensors
from ftkit.evaluate.inference import is_model_folder
from ftkit.models.convert import MARKER
from ftkit.models.resolve import resolve_model
from ftkit.ops.fuse import base_model_of, fuse

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


# config.json model_type -> (gguf architecture, q/k rows permuted to GGUF's RoPE order)
ARCHS = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
    "phi3": ("PHI3", False),
}


MERGED_ARCHS = ("llama", "mistral")


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise FtkitError("GGUF export needs the gguf package: pip install 'gguf>=0.10' (in ftkit[torch] and ftkit[dev]).") from e
    return gguf


def to_gguf_rope_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> GGUF's interleaved pairs (llama.cpp's `permute`); the inverse of
    ftkit.convert._interleaved_to_halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch(config: dict[str, Any], what: str, allowed=None) -> tuple[str, bool]:
    model_type = config.get("model_type")
    allowed = allowed or ARCHS
    if model_type not in allowed:
        raise FtkitError(f"{what}: model_type {model_type!r} is not supported for GGUF export "
                         f"(supported: {', '.join(allowed)}).")
    return ARCHS[model_type]


def _base_config(adapter: Path, model: str | None) -> tuple[dict[str, Any], str]:

    base = model or base_model_of(adapter)
    if not base:
        raise FtkitError(f"{adapter} does not record its base model; pass --model (a folder, .gguf or hub id).")
    folder = resolve_model(base)
    path = folder / "config.json"
    if not path.exists():
        raise FtkitError(f"{folder}: no config.json; --model must be the adapter's base model.")
    return json.loads(path.read_text()), base


def _encode(gguf, arr: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors and rows q8_0 cannot block stay f32."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    q = gguf.GGMLQuantizationType
    if arr.ndim == 1 or outtype == "f32":
        return arr, None
    if outtype == "f16":
        return arr.astype(np.float16), None
    kind = q.BF16 if outtype == "bf16" else q.Q8_0
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if arr.shape[-1] % block:
        return arr.astype(np.float16), None  # llama.cpp's converter falls back the same way
    return gguf.quants.quantize(arr, kind), kind


def _file_type(gguf, outtype: str):
    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0}[outtype]


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tmp_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def export_lora(adapter: Path, out: Path | None = None, *, model: str | None = None, outtype: str = "f32",
                force: bool = False) -> dict[str, Any]:
    """The adapter as a llama.cpp GGUF LoRA; returns what was written (path, bytes, tensors, alpha)."""
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise FtkitError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}.")
    adapter = resolve(adapter)
    config, weights = adapter_layout.read_adapter(adapter)
    kind = adapter_layout.adapter_kind(config)
    if kind != "lora":
        hint = "merge it first: ftkit export ... --merged writes the fused model" if kind == "dora" else "llama.cpp loads LoRA adapters only"
        raise FtkitError(f"{adapter}: a {kind} adapter; llama.cpp's GGUF adapters are plain LoRA ({hint}).")
    base, base_name = _base_config(adapter, model)
    arch_name, permute = _arch(base, str(adapter))
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_layers = base["num_hidden_layers"]
    n_head = base["num_attention_heads"]
    n_kv = base.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(arch, n_layers)
    out = Path(out) if out else _default_out(adapter, f"lora-{outtype}")
    if out.exists() and not force:
        raise FtkitError(f"{out} already exists; pass --force to replace it, or choose another --out.")
    rank = {weights.rank(m) for m in weights.modules}
    if len(rank) != 1:
        raise FtkitError(f"{adapter}: modules of different ranks {sorted(rank)}; llama.cpp reads one rank per file.")
    (r,) = rank
    # llama.cpp scales every module by alpha / rank; rsLoRA's lora_alpha / sqrt(r) needs alpha * sqrt(r) here.
    alpha = float(config.get("lora_alpha", 8)) * (math.sqrt(r) if config.get("use_rslora") else 1.0)

    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module in weights.modules:
        gname = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise FtkitError(f"{adapter}: no GGUF tensor for {module} (architecture {arch_name}).")
        a, b = weights.a[module], weights.b[module]
        leaf = module.rsplit(".", 1)[-1]
        if permute and leaf in ("q_proj", "k_proj"):
            b = to_gguf_rope_order(b, n_head if leaf == "q_proj" else n_kv)
        tensors[gname] = (a, b)

    writer_arch = gguf.MODEL_ARCH_NAMES[arch]
    tmp = _tmp_for(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), writer_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"{Path(base_name).name} LoRA (ftkit)")
    writer.add_file_type(_file_type(gguf, outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for gname, (a, b) in sorted(tensors.items()):
        for suffix, arr in ((".lora_a", a), (".lora_b", b)):
            data, raw = _encode(gguf, arr, outtype)
            writer.add_tensor(gname + suffix, data, raw_dtype=raw)
    try:
        _write(writer)
        check = read_gguf(tmp)
        want = {f"{g}{s}" for g in tensors for s in (".lora_a", ".lora_b")}
        if set(check["tensors"]) != want or check["fields"].get("general.type") != "adapter":
            raise FtkitError(f"{tmp}: the written file does not read back with the tensors it should hold.")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"gguf": str(out), "bytes": out.stat().st_size, "tensors": 2 * len(tensors), "modules": len(tensors),
            "rank": r, "alpha": alpha, "architecture": writer_arch, "outtype": outtype, "adapter": str(adapter)}


def _default_out(src: Path, tag: str) -> Path:
    """Beside the folder, named after the run: runs/NAME/adapter -> runs/NAME/NAME-lora-f32.gguf."""
    src = Path(src).resolve()
    name = src.parent.name if src.name == "adapter" else src.name
    return src.parent / f"{name}-{tag}.gguf"


def read_gguf(path: Path) -> dict[str, Any]:
    """{"fields": scalar metadata, "tensors": {name: (numpy array as stored, ggml type name)}}."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            fields[key] = field.contents()
        elif field.types:
            fields[key] = f"[array of {len(field.data)}]"
    tensors = {t.name: (t.data, t.tensor_type.name) for t in reader.tensors}
    return {"fields": fields, "tensors": tensors}


def _vocab(gguf, writer, folder: Path, tok, config: dict[str, Any]) -> None:
    """Byte-level BPE vocabulary as llama.cpp's `gpt2` tokenizer model (what SmolLM2, Llama 3, Qwen use)."""
    fast = getattr(tok, "backend_tokenizer", None)
    model = json.loads(fast.to_str())["model"] if fast is not None else {}
    if model.get("type") != "BPE":
        raise FtkitError(f"{folder}: a {model.get('type') or type(tok).__name__} tokenizer; ftkit exports byte-level BPE "
                         "vocabularies to GGUF (llama.cpp's convert_hf_to_gguf.py handles sentencepiece ones).")
    vocab = tok.get_vocab()
    size = max(config.get("vocab_size", 0), max(vocab.values()) + 1)
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    rev = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(size):
        t = rev.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(T.CONTROL if added[t].special else T.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(T.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(folder), load_merges=True, n_vocab=size)
    if not special.merges:
        special.merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    if special.chat_template is None and getattr(tok, "chat_template", None):
        special.chat_template = tok.chat_template
    for name in ("bos", "eos", "pad"):
        tid = getattr(tok, f"{name}_token_id", None)
        if tid is not None and name not in special.special_token_ids:
            special.special_token_ids[name] = tid
    special.add_to_gguf(writer)


def _pre_tokenizer(folder: Path) -> str:
    """llama.cpp's pre-tokenizer name: the source GGUF's when the model was converted from one (ftkit convert
    records it), else "default" (llama.cpp then uses its generic byte-level split)."""

    for candidate in (folder, *_base_folders(folder)):
        marker = candidate / MARKER
        if marker.exists():
            src = Path(json.loads(marker.read_text()).get("source", {}).get("path", ""))
            if src.suffix == ".gguf" and src.is_file():
                pre = read_gguf(src)["fields"].get("tokenizer.ggml.pre")
                if pre:
                    return str(pre)
    return "default"


def _base_folders(folder: Path) -> list[Path]:
    meta = adapter_format.read_meta(folder) or {}
    path = meta.get("base_model", {}).get("path")
    return [Path(path)] if path and Path(path).is_dir() else []


def export_merged(src: Path, out: Path | None = None, *, model: str | None = None, outtype: str = "f16",
                  backend: str = "auto", force: bool = False) -> dict[str, Any]:
    """A fused model (a model folder, or an adapter fused onto its base first) as a llama.cpp GGUF."""
    import tempfile

    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise FtkitError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}.")
    src = Path(src)

    with tempfile.TemporaryDirectory(prefix="ftkit-export-") as scratch:
        folder = src
        if not (src.is_dir() and is_model_folder(src)):

            folder = Path(scratch) / "fused"
            fuse(src, folder, model=model, backend_name=backend, dequantize=True, force=True)
            meta = adapter_format.read_meta(folder) or {}
            base_path = meta.get("base_model", {}).get("path")
        else:
            base_path = None
        out = Path(out) if out else _default_out(src, outtype)
        if out.exists() and not force:
            raise FtkitError(f"{out} already exists; pass --force to replace it, or choose another --out.")
        return _write_model(gguf, folder, out, outtype, base_path)


def _write_model(gguf, folder: Path, out: Path, outtype: str, base_path: str | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    _arch(config, str(folder), {k: ARCHS[k] for k in MERGED_ARCHS})
    arch = gguf.MODEL_ARCH.LLAMA
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    scaling = config.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise FtkitError(f"{folder}: rope scaling {scaling.get('rope_type', scaling.get('type'))!r} is not exported; "
                         "use llama.cpp's convert_hf_to_gguf.py for this model.")
    names = gguf.get_tensor_name_map(arch, n_layers)
    tok = AutoTokenizer.from_pretrained(folder)

    tmp = _tmp_for(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(folder.name if folder.name != "fused" else Path(base_path or "model").name + " (fused, ftkit)")
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(_file_type(gguf, outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(gguf, writer, folder, tok, config)

    count = 0
    for shard in sorted(folder.glob("*.safetensors")):
        for key, arr in read_safetensors(shard).items():  # bfloat16 comes back as float32
            if key.endswith("rotary_emb.inv_freq"):
                continue
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise FtkitError(f"{shard}: no GGUF tensor name for {key}.")
            arr = arr.astype(np.float32)
            if key.endswith("q_proj.weight"):
                arr = to_gguf_rope_order(arr, n_head)
            elif key.endswith("k_proj.weight"):
                arr = to_gguf_rope_order(arr, n_kv)
            data, raw = _encode(gguf, arr, outtype)
            writer.add_tensor(gname, data, raw_dtype=raw)
            count += 1
    try:
        _write(writer)
        check = read_gguf(tmp)
        if len(check["tensors"]) != count or "tokenizer.ggml.tokens" not in check["fields"]:
            raise FtkitError(f"{tmp}: the written file does not read back with the tensors it should hold.")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"gguf": str(out), "bytes": out.stat().st_size, "tensors": count, "architecture": "llama", "outtype": outtype,
            "pre_tokenizer": check["fields"].get("tokenizer.ggml.pre")}
