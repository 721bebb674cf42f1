from __future__ import annotations

import os
from pathlib import Path

import pytest
from builders import WIKISQL, build_tiny_llama, build_tokenizer, wikisql_slice

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MFU's peak for every run the suite starts (child processes too): no GEMM probe in a test that does not ask for one
os.environ.setdefault("FTKIT_PEAK_FLOPS", "1e12")
# torch.precision = "auto" on a CPU: fp32 on every machine, so that pinned losses do not depend on the CPU's bf16 flags
os.environ.setdefault("FTKIT_CPU_BF16", "0")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def wikisql_dir() -> Path:
    return WIKISQL


@pytest.fixture(scope="session")
def stories_model_dir(tmp_path_factory) -> Path:
    """stories260K (a real pretrained 260K-parameter Llama, llama2.c format) as a Hugging Face folder."""
    pytest.importorskip("torch")
    from builders import STORIES

    from ftkit.models.convert import convert

    src = STORIES / "stories260K.bin"
    if not src.exists():
        pytest.skip(f"{src} is not here")
    return convert(src, tmp_path_factory.mktemp("stories260K") / "model")


@pytest.fixture
def small_data(tmp_path, wikisql_dir) -> Path:
    """A 48/16/16 slice of WikiSQL so that each test trains in seconds."""
    d = wikisql_slice(tmp_path / "data", train=48, valid=16, test=16)
    return d
