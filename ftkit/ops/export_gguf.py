"""`ftkit export`: an adapter as a GGUF LoRA file for llama.cpp and Ollama, or a fused model as GGUF.

The LoRA file follows llama.cpp's convert_lora_to_gguf.py: general.type = "adapter", adapter.type =
"lora", adapter.lora.alpha (llama.cpp scales by alpha / rank), and for every adapted linear layer
`<gguf tensor name>.lora_a` with PEFT's A as it is (numpy (r, in), ggml ne = [in, r]) and `.lora_b`
with B (numpy (out, r)). A mixture of experts' LoRA becomes one 3-D pair per projection (A: (n_expert, r,
in), B: (n_expert, out, r)), which llama.cpp's mul_mat_id reads: per-expert linear LoRAs are stacked, as
that converter does, and a LoRA on transformers 5's `...experts.gate_up_proj` has its B split into
ffn_gate_exps and ffn_up_exps (gate rows first; A is shared).

Tensor names come from the `gguf` package's own maps (gguf.get_tensor_name_map for the family's
architecture), so a family costs one line in FAMILIES, not a table of names. What a line says is what
llama.cpp's convert_hf_to_gguf.py does differently per family:
- the architecture it writes (Mistral and Mixtral are "llama", Cohere is "command-r", OLMo 3 is "olmo2");
- whether its class reorders q/k rows from Hugging Face's rotate-half RoPE to GGUF's interleaved pairs
  (LlamaModel and its subclasses: Llama, Mistral, Mixtral, Granite, SmolLM3). A LoRA on q_proj / k_proj
  gets the same permutation of B's rows (W = B A, so permuting W's rows is permuting B's);
- Gemma's norms, whose weight w scales by (1 + w): the fused model stores w + 1.
The fused model is refused where llama.cpp hard-codes a setting the model does not share (Qwen3-MoE's
renormalised expert weights, OLMoE with grouped-query attention, Gemma's attention scale, SmolLM3's
RoPE-less layers): such a GGUF would load and compute another model.

The fused model is written the same way convert_hf_to_gguf.py writes it: the family's hyperparameters,
the byte-level BPE vocabulary and merges, special tokens and chat template, and each weight in
f32 / f16 / bf16 / q8_0 (norms stay f32). Both files are read back with gguf's reader before the
command says done.

The `gguf` package (llama.cpp's own gguf-py) does the writing, the quantization and the reading.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ftkit.adapters import layout as adapter_layout
from ftkit.adapters import meta as adapter_format
from ftkit.adapters.resolve import resolve
from ftkit.common.atomic import atomic_path
from ftkit.common.errors import FtkitError
from ftkit.common.tensors import read_safetensors
from ftkit.evaluate.inference import is_model_folder
from ftkit.models.convert import MARKER
from ftkit.models.resolve import resolve_model
from ftkit.ops.fuse import base_model_of, fuse
from ftkit.ops.gguf_arch import (
    Family,
    check_runs_alike,
    family_of,
    gguf_name,
    hparams,
    load_gguf,
    n_experts,
    qk_heads,
    to_gguf_rope_order,
)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


# Per-expert projections (`...experts.3.gate_proj`, Mixtral's `...experts.3.w1`), stacked into one tensor.
_EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<index>\d+)\.(?P<leaf>[^.]+)(?P<suffix>\.weight|\.bias)?$")


def _base_config(adapter: Path, model: str | None) -> tuple[dict[str, Any], str]:

    base = model or base_model_of(adapter)
    if not base:
        raise FtkitError(f"{adapter} does not record its base model; pass --model (a folder, .gguf or hub id).")
    folder = resolve_model(base)
    path = folder / "config.json"
    if not path.exists():
        raise FtkitError(f"{folder}: no config.json; --model must be the adapter's base model.")
    return json.loads(path.read_text()), base


def _encode(gguf, arr: np.ndarray, outtype: str, keep_f32: bool = False) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors (and `keep_f32` ones) stay f32, rows q8_0
    cannot block become f16."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    q = gguf.GGMLQuantizationType
    if arr.ndim == 1 or keep_f32 or outtype == "f32":
        return arr, None
    if outtype == "f16":
        return arr.astype(np.float16), None
    kind = q.BF16 if outtype == "bf16" else q.Q8_0
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if arr.shape[-1] % block:
        return arr.astype(np.float16), None  # llama.cpp's converter falls back the same way
    return gguf.quants.quantize(arr, kind), kind


# What convert_hf_to_gguf.py keeps in f32 whatever the outtype: norms (Cohere's q/k norms are 2-D) and
# the expert routers, whose small logits decide which experts run.
_F32_TENSOR = re.compile(r"(_norm|\.ffn_gate_inp|\.ffn_gate_inp_shexp)\.weight$")


def _file_type(gguf, outtype: str):
    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0}[outtype]


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _stack_lora_experts(pairs: dict[str, tuple[np.ndarray, np.ndarray]], n_experts: int,
                        where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-expert LoRA pairs -> one (n_expert, ...) pair per projection, as convert_lora_to_gguf.py stacks
    them; an expert the adapter leaves alone gets zeros (it adds nothing)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    experts: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for module, pair in pairs.items():
        match = _EXPERT.match(module)
        if match is None:
            out[module] = pair
            continue
        index = int(match["index"])
        if index >= n_experts:
            raise FtkitError(f"{where}: {module} is expert {index}, but the base model has {n_experts} experts.")
        experts.setdefault(f"{match['head']}.{match['leaf']}", {})[index] = pair
    for module, by_index in experts.items():
        a0, b0 = next(iter(by_index.values()))
        zeros = (np.zeros_like(a0), np.zeros_like(b0))
        stack = [by_index.get(i, zeros) for i in range(n_experts)]
        out[module] = (np.stack([a for a, _ in stack]), np.stack([b for _, b in stack]))
    return out


def _split_gate_up(name: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """transformers 5 keeps a block's experts as `...experts.gate_up_proj` (gate rows first) and
    `...experts.down_proj`; llama.cpp keeps ffn_gate_exps and ffn_up_exps apart, as its converter splits them."""
    if not _is_expert_param(name, arr) or not name.endswith(".gate_up_proj"):
        return [(name, arr)]
    head = name.removesuffix(".gate_up_proj")
    gate, up = np.split(arr, 2, axis=1)  # (experts, rows, ...): a weight's rows, or a LoRA B's
    return [(f"{head}.gate_proj", gate), (f"{head}.up_proj", up)]


def _is_expert_param(name: str, arr: np.ndarray) -> bool:
    return arr.ndim == 3 and name.endswith((".experts.gate_up_proj", ".experts.down_proj"))


def lora_tensors(weights, config: dict[str, Any], family: Family, names, arch_name: str,
                 where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{gguf base tensor name: (A, B)} in llama.cpp's layout, from PEFT's per-module A and B (and ftkit's
    per-expert a (experts, r, in), b (experts, out, r) for a MoE block's expert parameters)."""
    pairs = {}
    for module in weights.modules:
        a = weights.a[module]
        # W = B A row by row: splitting W's rows into gate and up splits B's, A is shared.
        pairs.update({m: (a, b) for m, b in _split_gate_up(module, weights.b[module])})
    pairs = _stack_lora_experts(pairs, n_experts(config), where)
    heads = qk_heads(config)
    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, (a, b) in pairs.items():
        gname = gguf_name(names, module + ".weight", where, arch_name)
        leaf = module.rsplit(".", 1)[-1]
        if family.permute_qk and leaf in heads:
            b = to_gguf_rope_order(b, heads[leaf])
        if gname in tensors:
            raise FtkitError(f"{where}: two modules map to the GGUF tensor {gname}; llama.cpp reads one LoRA per tensor.")
        tensors[gname] = (a, b)
    return tensors


def export_lora(adapter: Path, out: Path | None = None, *, model: str | None = None, outtype: str = "f32",
                force: bool = False) -> dict[str, Any]:
    """The adapter as a llama.cpp GGUF LoRA; returns what was written (path, bytes, tensors, alpha)."""
    gguf = load_gguf()
    if outtype not in OUTTYPES:
        raise FtkitError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}.")
    adapter = resolve(adapter)
    config, weights = adapter_layout.read_adapter(adapter)
    kind = adapter_layout.adapter_kind(config)
    if kind != "lora":
        hint = "merge it first: ftkit export ... --merged writes the fused model" if kind == "dora" else "llama.cpp loads LoRA adapters only"
        raise FtkitError(f"{adapter}: a {kind} adapter; llama.cpp's GGUF adapters are plain LoRA ({hint}).")
    base, base_name = _base_config(adapter, model)
    family, arch = family_of(gguf, base, str(adapter))
    writer_arch = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, base["num_hidden_layers"])
    out = Path(out) if out else _default_out(adapter, f"lora-{outtype}")
    if out.exists() and not force:
        raise FtkitError(f"{out} already exists; pass --force to replace it, or choose another --out.")
    rank = {weights.rank(m) for m in weights.modules}
    if len(rank) != 1:
        raise FtkitError(f"{adapter}: modules of different ranks {sorted(rank)}; llama.cpp reads one rank per file.")
    (r,) = rank
    # llama.cpp scales every module by alpha / rank; rsLoRA's lora_alpha / sqrt(r) needs alpha * sqrt(r) here.
    alpha = float(config.get("lora_alpha", 8)) * (math.sqrt(r) if config.get("use_rslora") else 1.0)
    tensors = lora_tensors(weights, base, family, names, writer_arch, str(adapter))

    with atomic_path(out) as tmp:
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
        _write(writer)
        check = read_gguf(tmp)
        want = {f"{g}{s}" for g in tensors for s in (".lora_a", ".lora_b")}
        if set(check["tensors"]) != want or check["fields"].get("general.type") != "adapter":
            raise FtkitError(f"{out}: the written file does not read back with the tensors it should hold.")
    return {"gguf": str(out), "bytes": out.stat().st_size, "tensors": 2 * len(tensors), "modules": len(tensors),
            "rank": r, "alpha": alpha, "architecture": writer_arch, "outtype": outtype, "adapter": str(adapter)}


def _default_out(src: Path, tag: str) -> Path:
    """Beside the folder, named after the run: runs/NAME/adapter -> runs/NAME/NAME-lora-f32.gguf."""
    src = Path(src).resolve()
    name = src.parent.name if src.name == "adapter" else src.name
    return src.parent / f"{name}-{tag}.gguf"


def read_gguf(path: Path) -> dict[str, Any]:
    """{"fields": scalar metadata, "tensors": {name: (numpy array as stored, ggml type name)}}."""
    gguf = load_gguf()
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
    spec = json.loads(fast.to_str()) if fast is not None else {}
    model = spec.get("model") or {}
    # A sentencepiece vocabulary carried as BPE (Llama 2, Mistral v0.1, Gemma: byte fallback, "▁" for spaces)
    # would tokenize differently under llama.cpp's gpt2 model; its converter writes those as "llama".
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        what = "sentencepiece-style (byte fallback)" if model.get("byte_fallback") else (model.get("type") or type(tok).__name__)
        raise FtkitError(f"{folder}: a {what} tokenizer; ftkit exports byte-level BPE "
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

    gguf = load_gguf()
    if outtype not in OUTTYPES:
        raise FtkitError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}.")
    src = Path(src)

    with tempfile.TemporaryDirectory(prefix="ftkit-export-") as scratch:
        folder = src
        if not (src.is_dir() and is_model_folder(src)):
            family_of(gguf, _base_config(resolve(src), model)[0], str(src))  # before the fuse, not after it
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


def _shards(folder: Path) -> Iterator[tuple[Path, str, np.ndarray]]:
    for shard in sorted(folder.glob("*.safetensors")):
        for key, arr in read_safetensors(shard).items():  # bfloat16 comes back as float32
            yield shard, key, arr.astype(np.float32)


def _stacked_experts(tensors: Iterator[tuple[Path, str, np.ndarray]], n_experts: int) -> Iterator[tuple[Path, str, np.ndarray]]:
    """Per-expert weights -> one (n_expert, out, in) tensor per projection, yielded once every expert of
    it has been read (they may span shards), as convert_hf_to_gguf.py merges them."""
    pending: dict[str, dict[int, np.ndarray]] = {}
    for shard, key, arr in tensors:
        match = _EXPERT.match(key)
        if match is None or not n_experts:
            yield shard, key, arr
            continue
        name = f"{match['head']}.{match['leaf']}{match['suffix'] or ''}"
        pending.setdefault(name, {})[int(match["index"])] = arr
        if len(pending[name]) == n_experts:
            parts = pending.pop(name)
            yield shard, name, np.stack([parts[i] for i in range(n_experts)])
    if pending:
        raise FtkitError(f"expert tensors {sorted(pending)[:3]} miss some of the model's {n_experts} experts.")


def _unfused(tensors: Iterator[tuple[Path, str, np.ndarray]]) -> Iterator[tuple[Path, str, np.ndarray]]:
    """A checkpoint saved in transformers 5's in-memory expert layout: gate_up_proj split, .weight added."""
    for shard, key, arr in tensors:
        if not _is_expert_param(key, arr):
            yield shard, key, arr
            continue
        for name, part in _split_gate_up(key, arr):
            yield shard, name + ".weight", part


def _model_tensors(gguf, folder: Path, config: dict[str, Any], family: Family, arch) -> Iterator[tuple[str, np.ndarray]]:
    """(gguf name, array) for every weight of the model folder, with the family's conversions applied."""
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    has_output = gguf.MODEL_TENSOR.OUTPUT in gguf.MODEL_TENSORS[arch]
    heads = qk_heads(config)
    for shard, key, arr in _unfused(_stacked_experts(_shards(folder), n_experts(config))):
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight" and not has_output:
            # llama.cpp's Gemma and Gemma 2 read the output head from the embeddings.
            if config.get("tie_word_embeddings") is False:
                raise FtkitError(f"{shard}: an untied lm_head, but llama.cpp's {arch_name} ties it to the embeddings.")
            continue
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise FtkitError(f"{shard}: no GGUF tensor name for {key} in llama.cpp's {arch_name} architecture.")
        stem = key.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if family.permute_qk and stem in heads:
            arr = to_gguf_rope_order(arr, heads[stem])
        if family.norm_shift and key.endswith("norm.weight"):
            arr = arr + family.norm_shift
        yield gname, arr


def _write_model(gguf, folder: Path, out: Path, outtype: str, base_path: str | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    family, arch = family_of(gguf, config, str(folder))
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    check_runs_alike(config, family, arch_name, folder)
    tok = AutoTokenizer.from_pretrained(folder)

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch_name)
        writer.add_name(folder.name if folder.name != "fused" else Path(base_path or "model").name + " (fused, ftkit)")
        hparams(gguf, writer, config, family, folder)
        writer.add_file_type(_file_type(gguf, outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _vocab(gguf, writer, folder, tok, config)
        count = 0
        for gname, arr in _model_tensors(gguf, folder, config, family, arch):
            data, raw = _encode(gguf, arr, outtype, keep_f32=bool(_F32_TENSOR.search(gname)))
            writer.add_tensor(gname, data, raw_dtype=raw)
            count += 1
        _write(writer)
        check = read_gguf(tmp)
        if len(check["tensors"]) != count or "tokenizer.ggml.tokens" not in check["fields"]:
            raise FtkitError(f"{out}: the written file does not read back with the tensors it should hold.")
    return {"gguf": str(out), "bytes": out.stat().st_size, "tensors": count, "architecture": arch_name, "outtype": outtype,
            "pre_tokenizer": check["fields"].get("tokenizer.ggml.pre")}
