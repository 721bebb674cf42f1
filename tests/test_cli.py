"""The command line: --json outputs, help, clear errors, and the core without torch or mlx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import wikisql_slice
from typer.testing import CliRunner

from ftkit.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run_json(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout  # exactly one JSON object on stdout
    return json.loads(lines[0])


@pytest.fixture
def recipe(tmp_path, tiny_model_dir, wikisql_dir) -> Path:
    data = wikisql_slice(tmp_path / "data", train=32, valid=8, test=8)
    p = tmp_path / "r.toml"
    p.write_text(
        f'[model]\npath = "{tiny_model_dir}"\n[method]\nrank = 4\n[data]\npath = "{data}"\nmax_seq_length = 256\n'
        f'[train]\niters = 4\nbatch_size = 4\nlr = 3e-3\nsteps_per_eval = 2\n[output]\ndir = "{tmp_path / "run"}"\n'
        '[torch]\nprecision = "fp32"\n'
    )
    return p


def test_train_eval_generate_json(recipe, tiny_model_dir, tmp_path):
    out = run_json("train", str(recipe), "--backend", "torch")
    assert out["backend"] == "torch" and out["steps"] == 4
    assert Path(out["adapter"]).is_dir()
    assert out["last_valid_loss"] < out["first_valid_loss"]

    ev = run_json("eval", str(recipe), "--adapter", out["adapter"], "--backend", "torch")
    assert ev["split"] == "test" and ev["examples"] == 8
    assert ev["perplexity"] == pytest.approx(__import__("math").exp(ev["loss"]))
    base = run_json("eval", str(recipe), "--backend", "torch")
    assert base["loss"] > ev["loss"]  # the adapter learned something

    g1 = run_json("generate", "--model", str(tiny_model_dir), "--adapter", out["adapter"], "--prompt", "table:",
                  "--max-tokens", "8", "--backend", "torch")
    assert g1["tokens"] <= 8 and isinstance(g1["text"], str)
    s1 = run_json("generate", "--model", str(tiny_model_dir), "--prompt", "table:", "--max-tokens", "12",
                  "--temperature", "1.0", "--seed", "7", "--backend", "torch")
    s2 = run_json("generate", "--model", str(tiny_model_dir), "--prompt", "table:", "--max-tokens", "12",
                  "--temperature", "1.0", "--seed", "7", "--backend", "torch")
    s3 = run_json("generate", "--model", str(tiny_model_dir), "--prompt", "table:", "--max-tokens", "12",
                  "--temperature", "1.0", "--seed", "8", "--backend", "torch")
    assert s1["text"] == s2["text"] and s1["text"] != s3["text"]

    # --resume auto on a finished run reports it instead of retraining
    again = run_json("train", str(recipe), "--backend", "torch", "--resume", "auto")
    assert again["adapter"] == out["adapter"] and again["stages"][0]["resumed_from"] == "finished earlier"


def test_dry_run_and_set(recipe):
    out = run_json("train", str(recipe), "--dry-run", "--set", "train.iters=9", "--set", "train.steps_per_eval=3")
    (stage,) = out["stages"]
    assert stage["total_steps"] == 9 and stage["steps_per_eval"] == 3
    assert stage["examples"] == {"train": 32, "valid": 8, "test": 8}


def test_data_summary_json(recipe):
    out = run_json("data", "summary", str(recipe), "--set", "data.max_seq_length=40")
    assert out["format"] == "text" and out["splits"]["train"]["count"] == 32
    assert out["splits"]["train"]["truncated"] > 0


def test_recipe_errors_are_json_and_exit_2(recipe):
    result = runner.invoke(app, ["train", str(recipe), "--set", "train.itres=3", "--json"])
    assert result.exit_code == 2
    err = json.loads(result.stdout)["error"]
    assert "train.itres" in err and "iters" in err


def test_info_json():
    out = run_json("info")
    assert out["auto"][0] == "torch" and "cores_logical" in out


def test_every_command_has_help():
    for cmd in (["--help"], ["train", "--help"], ["eval", "--help"], ["generate", "--help"], ["info", "--help"],
                ["convert", "--help"], ["data", "summary", "--help"], ["recipe", "defaults", "--help"]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 0 and "Usage" in result.output, cmd


def test_core_imports_and_helps_without_torch_or_mlx(tmp_path):
    """`import ftkit` and `ftkit --help` work where neither backend is installed; asking for one says what to install."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'mlx', 'mlx_lm'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    code = (
        "import importlib, pkgutil, sys, ftkit\n"
        "for m in pkgutil.walk_packages(ftkit.__path__, 'ftkit.'):\n    importlib.import_module(m.name)\n"
        "assert not any(m.split('.')[0] in ('torch', 'mlx') for m in sys.modules), [m for m in sys.modules if 'torch' in m]\n"
        "from ftkit.backend.registry import get_backend\n"
        "try:\n    get_backend('mlx')\nexcept Exception as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install" in out.stdout and "mlx" in out.stdout
    helped = subprocess.run([sys.executable, "-m", "ftkit.cli", "--help"], env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "train" in helped.stdout


def test_human_errors_keep_brackets(tmp_path, wikisql_dir):
    """Recipe errors name sections like [trian]; rich markup must not swallow them."""
    p = tmp_path / "bad.toml"
    p.write_text(f'[model]\npath = "{tmp_path}"\n[data]\npath = "{wikisql_dir}"\n[trian]\nx = 1\n')
    result = runner.invoke(app, ["train", str(p)])
    assert result.exit_code == 2
    assert "unknown section [trian]" in result.output and "Did you mean 'train'" in result.output
