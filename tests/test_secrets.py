"""Secrets come only from the environment and never reach a run folder, a log or ftkit's output.

A pod gets HF_TOKEN (gated models; huggingface_hub reads it itself), WANDB_API_KEY and runpod's own
RUNPOD_API_KEY in its environment. Here they are sentinels: a real training through the pod's start
script (deploy/runpod/start.sh), and the commands around it, must not write them anywhere. Also: the
runpod template holds placeholders only, and the start script keeps ftkit's exit code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from builders import REPO, recipe_file

START = REPO / "deploy" / "runpod" / "start.sh"
TEMPLATE = REPO / "deploy" / "runpod" / "template.json"
VENV_BIN = str(Path(sys.executable).parent)
TAG = uuid.uuid4().hex[:12]
SECRETS = {
    "HF_TOKEN": f"hf_SENTINEL{TAG}hftoken",
    "HUGGING_FACE_HUB_TOKEN": f"hf_SENTINEL{TAG}legacy",
    "WANDB_API_KEY": f"SENTINEL{TAG}wandbkey",
    "RUNPOD_API_KEY": f"SENTINEL{TAG}runpodkey",
}


def base_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **SECRETS, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf-home"), "FTKIT_CACHE": str(tmp_path / "ftkit-cache")}


def leaks(data: bytes | str) -> list[str]:
    if isinstance(data, str):
        data = data.encode()
    return [k for k, v in SECRETS.items() if v.encode() in data or TAG.encode() in data]


def run(cmd: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.skipif(sys.platform == "win32", reason="bash start script")
def test_secrets_reach_no_file_and_no_output(tmp_path, tiny_model_dir, small_data):
    pytest.importorskip("torch")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    recipe = recipe_file(tmp_path, tiny_model_dir, small_data, "secret", method={"dropout": 0.1},
                         train={"iters": 4, "save_every": 2, "steps_per_eval": 2},
                         output={"dir": str(workspace / "runs" / "secret")})
    env = {**base_env(tmp_path), "WORKSPACE": str(workspace), "FTKIT_RECIPE": str(recipe)}
    outputs = []

    # The training, as a pod runs it: through the start script, human-readable output, a log file.
    trained = run(["bash", str(START)], env)
    outputs.append(trained)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    run_dir = workspace / "runs" / "secret"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert list((run_dir / "checkpoints").iterdir()) and list((workspace / "logs").iterdir())

    ftkit = [sys.executable, "-m", "ftkit.cli"]
    for args in (
        ["train", str(recipe), "--backend", "torch", "--resume", "auto", "--json"],  # finished: reported
        ["train", str(recipe), "--dry-run", "--json"],
        ["recipe", "check", str(recipe)],
        ["info", "--json"],
        ["info"],
    ):
        out = run(ftkit + args, env)
        assert out.returncode == 0, (args, out.stderr[-3000:])
        outputs.append(out)
    # A hub download that fails (offline here) reports its error: without the token.
    failed = run(ftkit + ["train", str(recipe), "--set", "model.path=some-org/gated-model",
                          "--set", f"output.dir={tmp_path / 'run-hub'}", "--json"], env)
    assert failed.returncode == 2 and "some-org/gated-model" in failed.stdout
    outputs.append(failed)

    for out in outputs:
        assert not leaks(out.stdout) and not leaks(out.stderr), f"{out.args}: a secret in the output"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"metrics.jsonl", "recipe.toml", "ftkit.json", "adapter_config.json", "trainer_state.json",
            "torch_state.pt", "final_state.json", "loss.png"} <= names
    assert any(p.suffix == ".log" for p in files)
    found = {str(p.relative_to(tmp_path)): leaks(p.read_bytes()) for p in files}
    assert not {p: k for p, k in found.items() if k}, "secrets written to files"


def fake_ftkit(tmp_path: Path, exit_code: int) -> dict[str, str]:
    """An `ftkit` first on PATH that says what it got and exits with `exit_code` (python, with the real
    ftkit importable, stays what start.sh checks)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    stub = bin_dir / "ftkit"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'echo "ARGS $*"\n'
        'for v in HF_TOKEN WANDB_API_KEY HF_HOME; do if [ -n "${!v+x}" ]; then echo "$v set"; else echo "$v unset"; fi; done\n'
        f"exit {exit_code}\n"
    )
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "WORKSPACE": str(tmp_path), "FTKIT_LOG_DIR": ""}


@pytest.mark.skipif(sys.platform == "win32", reason="bash start script")
def test_start_script_keeps_the_exit_code_and_drops_unresolved_placeholders(tmp_path):
    env = {**fake_ftkit(tmp_path, 3), "HF_TOKEN": "{{ RUNPOD_SECRET_hf_token }}", "WANDB_API_KEY": "",
           "FTKIT_RECIPE": "/workspace/recipes/a.toml /workspace/recipes/b.toml", "FTKIT_ARGS": "--set train.iters=5"}
    env.pop("HF_HOME", None)
    out = run(["bash", str(START)], env)
    assert out.returncode == 3, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("ARGS train /workspace/recipes/a.toml /workspace/recipes/b.toml --backend torch "
                        "--resume auto --set train.iters=5")
    assert "HF_TOKEN unset" in lines and "WANDB_API_KEY unset" in lines and "HF_HOME set" in lines
    assert "ftkit exited with 3" in out.stderr

    # Arguments replace FTKIT_RECIPE; several GPUs go through `ftkit launch`; a real token stays set.
    env.update(HF_TOKEN=SECRETS["HF_TOKEN"], FTKIT_NPROC="4", FTKIT_ARGS="")
    out = run(["bash", str(START), "/workspace/recipes/c.toml"], env)
    assert out.returncode == 3
    assert out.stdout.splitlines()[0] == "ARGS launch /workspace/recipes/c.toml --nproc-per-node 4 --backend torch --resume auto"
    assert "HF_TOKEN set" in out.stdout and not leaks(out.stdout + out.stderr)

    env.update(FTKIT_NPROC="two")
    assert run(["bash", str(START)], env).returncode == 2


def test_start_script_parses():
    assert subprocess.run(["bash", "-n", str(START)]).returncode == 0
    text = START.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "set -x" not in text  # would print every secret it touches


def test_runpod_template_holds_placeholders_only():
    t = json.loads(TEMPLATE.read_text())
    for key, kind in (("name", str), ("imageName", str), ("containerDiskInGb", int), ("volumeInGb", int),
                      ("volumeMountPath", str), ("dockerArgs", str), ("env", list)):
        assert isinstance(t.get(key), kind), key
    assert t["volumeMountPath"] == "/workspace" and "deploy/runpod/start.sh" in t["dockerArgs"]
    env = {e["key"]: e["value"] for e in t["env"]}
    assert len(env) == len(t["env"]) and all(set(e) == {"key", "value"} for e in t["env"])
    placeholder = re.compile(r"^\{\{ RUNPOD_SECRET_\w+ \}\}$")
    for key in ("HF_TOKEN", "WANDB_API_KEY"):
        assert placeholder.match(env[key]), key
    secretish = re.compile(r"hf_[A-Za-z0-9]{20,}|\b[0-9a-f]{40}\b|rpa_[A-Za-z0-9]{20,}")
    for key, value in env.items():
        if re.search(r"TOKEN|KEY|SECRET|PASSWORD", key):
            assert placeholder.match(value), f"{key}: a literal value where a runpod secret belongs"
        assert not secretish.search(value), key
    assert not secretish.search(TEMPLATE.read_text())


def test_docker_build_carries_no_secrets():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert not re.search(r"^\s*(ENV|ARG)\b.*(TOKEN|API_KEY|SECRET)", dockerfile, re.M | re.I)
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # an allow-list: .git, .venv, runs, models, .env files never enter the build context
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "ftkit", "backends", "deploy"}
