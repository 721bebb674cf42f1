"""Tiny, offline stand-ins for real models: a BPE tokenizer trained here and a config-built Llama."""

from __future__ import annotations

import json
import os
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
# The core and both backends' folders, for subprocesses started with a clean environment.
PYTHONPATH = os.pathsep.join(str(p) for p in (REPO, REPO / "backends" / "torch", REPO / "backends" / "mlx"))
WIKISQL = REPO / "data" / "wikisql"
SHARED = REPO.parent / "shared"
# A real pretrained 260K-parameter Llama (llama2.c format, MIT), copied with its PROVENANCE.md.
STORIES = REPO / "tests" / "assets" / "stories260K"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def wikisql_slice(dest: Path, **sizes: int) -> Path:
    """The first rows of WikiSQL's splits (e.g. train=48, valid=16, test=16) copied into `dest`: real data
    small enough that a test run trains in seconds."""
    dest.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rows = (WIKISQL / f"{split}.jsonl").read_text().splitlines()[:n]
        (dest / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return dest


def build_tokenizer(dest: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE trained on the WikiSQL training text, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (WIKISQL / "train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    dest.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(dest)
    return dest


def build_tiny_llama(dest: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64) with the tokenizer above, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tokenizer(dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def recipe_file(tmp_path: Path, model: Path, data: Path, /, name: str = "r", **sections) -> Path:
    """A recipe file for a tiny-model test run; `sections` override keys (model=..., train=..., ...)."""
    body = {
        "model": {"path": str(model)},
        "method": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data), "max_seq_length": 256},
        "train": {"iters": 6, "batch_size": 4, "lr": 3e-3, "steps_per_eval": 3, "steps_per_report": 1,
                  "save_every": 2, "val_batches": 2, "seed": 0},
        "output": {"dir": str(tmp_path / f"run-{name}")},
        "torch": {"precision": "fp32"},  # exact comparisons; on a GPU too
    }
    for section, values in sections.items():
        body.setdefault(section, {}).update(values)
    p = tmp_path / f"{name}.toml"
    p.write_text(tomli_w.dumps(body), encoding="utf-8")  # tomli-w: any character, the emoji too, reads back
    return p


def train_hiding(recipe: Path, backend: str, hidden: list[str]) -> dict:
    """`ftkit train RECIPE --backend B --json` in a fresh interpreter where the `hidden` packages
    cannot be imported (as if not installed; transformers then sees them as absent too); its JSON result."""
    import os
    import subprocess
    import sys

    code = (
        f"import sys; sys.modules.update(dict.fromkeys({hidden!r}))\n"
        f"from ftkit.cli import main; sys.argv = ['ftkit', 'train', sys.argv[1], '--backend', {backend!r}, '--json']; main()\n"
    )
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    out = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def logits_on(backend_name: str, model_dir: Path, adapter: Path | None, prompt: str):
    """Logits for every position of `prompt` (virtual tokens left out), through the backend's own
    inference path (ftkit.evaluate.inference), as a float32 numpy array."""
    import numpy as np

    from ftkit.evaluate.inference import load_for_inference
    from ftkit.models.tokenizer import load_tokenizer
    from ftkit.recipe.load import build_recipe

    tok = load_tokenizer(model_dir)
    recipe = build_recipe({"model": {"path": str(model_dir)}, "data": {"path": "-"}, "torch": {"precision": "fp32"}}, "t", check_paths=False)
    be = load_for_inference(recipe, backend_name, adapter, model_dir, tok)
    ids = tok(prompt).input_ids
    if backend_name == "torch":
        import torch

        with torch.no_grad():
            return be.model(input_ids=torch.tensor([ids])).logits[0, be.n_virtual :].float().numpy()
    import mlx.core as mx

    return np.array(be.tuned(mx.array([ids]))[0].astype(mx.float32))


# ---------------------------------------------------------------- preference pairs (tests/test_preference_*.py)
PAIR_PAD = 3  # the pad id of the pair tests' batches


def moved(tensors: dict, seed: int = 1, size: float = 0.05) -> dict:
    """A's drawn, B non-zero: a policy that differs from the base."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {k: (v + size * rng.standard_normal(v.shape).astype(np.float32)) if "lora_B" in k else v for k, v in tensors.items()}


def random_pairs(n: int = 4, seed: int = 0, vocab: int = 400) -> list:
    """Prompt + chosen / prompt + rejected token ids of varied lengths (the mask marks each response)."""
    import numpy as np

    from ftkit.data.batch import Example, Pair

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(10, vocab, int(rng.integers(4, 12))).tolist()
        chosen, rejected = (rng.integers(10, vocab, int(rng.integers(2, 9))).tolist() for _ in range(2))
        out.append(Pair(Example(prompt + chosen, [0] * len(prompt) + [1] * len(chosen)),
                        Example(prompt + rejected, [0] * len(prompt) + [1] * len(rejected))))
    return out


def one_batch(ps: list, packing: bool = False):
    """All of `ps` as one pair micro-batch."""
    from ftkit.data.pairs import pair_micro_batches

    (pb,) = pair_micro_batches(ps, len(ps), PAIR_PAD, packing)
    return pb


# ---------------------------------------------------------------- bench/ scripts imported by tests
def bench_module(name: str):
    """bench/<name>.py imported with bench/ on sys.path (its `harness` imports need it) for as long as a test runs:
    a fixture's body, `yield from bench_module("cpu_bf16")`."""
    import importlib
    import sys

    bench = str(REPO / "bench")
    sys.path.insert(0, bench)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(bench)
