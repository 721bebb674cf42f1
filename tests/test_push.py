"""ftkit push, and hub ids for --model / --adapter, against a local stand-in of the hub's HTTP API
(tests/hub_standin.py): huggingface_hub's real upload and download code, no token, no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from builders import PYTHONPATH, recipe_file, wikisql_slice
from hub_standin import Hub

pytest.importorskip("huggingface_hub")


def hub_env(tmp_path, hub):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return {**env, "PYTHONPATH": PYTHONPATH, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf-home"), "FTKIT_CACHE": str(tmp_path / "ftkit-cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def ftkit(args, env):
    out = subprocess.run([sys.executable, "-m", "ftkit.cli", *args, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, wikisql_dir):
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("push")
    data = wikisql_slice(tmp / "data", train=32, valid=8)
    recipe = recipe_file(tmp, tiny_model_dir, data, "pushed", train={"iters": 4, "steps_per_eval": 2, "lr": 1e-2})
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "ftkit.cli", "train", str(recipe), "--backend", "torch", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp / "run-pushed"


@pytest.mark.slow
def test_push_uploads_adapter_with_card_and_hub_ids_load_it_back(tmp_path, trained, tiny_model_dir):
    with Hub() as hub:
        env = hub_env(tmp_path, hub)
        base = ftkit(["push", str(tiny_model_dir), "--repo", "user/tiny-base"], env)
        assert base["card"] == "generated" and "config.json" in base["files"]
        pushed = ftkit(["push", str(trained), "--repo", "user/tiny-lora", "--private", "--base-model", "user/tiny-base"], env)
        repo = hub.repos["user/tiny-lora"]
        assert repo["private"] is True and not hub.repos["user/tiny-base"]["private"]
        assert set(repo["files"]) == {"adapter_config.json", "adapter_model.safetensors", "ftkit.json", "README.md"}
        assert repo["files"]["adapter_model.safetensors"] == (trained / "adapter" / "adapter_model.safetensors").read_bytes()
        assert json.loads(repo["files"]["adapter_config.json"])["base_model_name_or_path"] == "user/tiny-base"
        uploaded_meta = json.loads(repo["files"]["ftkit.json"])["base_model"]
        assert uploaded_meta["path"] == "user/tiny-base" and uploaded_meta["trained_on"]["path"] == str(tiny_model_dir)
        assert pushed["url"] and pushed["base_model"] == "user/tiny-base"
        card = repo["files"]["README.md"].decode()
        head = card.split("---")[1]
        assert "base_model: user/tiny-base" in head and "library_name: peft" in head and "- ftkit" in head
        assert 'PeftModel.from_pretrained(base, "user/tiny-lora")' in card
        assert "ftkit generate --model user/tiny-base --adapter user/tiny-lora" in card and "--backend mlx" in card
        valid = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines() if '"valid"' in line]
        assert f"{valid[-1]['loss']:.4f}" in card and "```toml" in card and "rank = 4" in card
        assert all(a is None for a in hub.auth), "a token was sent"
        assert not hub.unknown, hub.unknown

        # Hub ids wherever a path is accepted: the same generation from the hub as from the local folders.
        args = ["--prompt", "SELECT", "--max-tokens", "12", "--backend", "torch"]
        local = ftkit(["generate", "--model", str(tiny_model_dir), "--adapter", str(trained / "adapter"), *args], env)
        remote = ftkit(["generate", "--model", "user/tiny-base", "--adapter", "user/tiny-lora", *args], env)
        assert remote["text"] == local["text"] and remote["tokens"] == 12
        bare = ftkit(["generate", "--model", str(tiny_model_dir), *args], env)
        assert bare["text"] != local["text"]  # the adapter changed the output
        assert ("GET", "/user/tiny-lora/resolve/" + hub._sha(repo) + "/adapter_model.safetensors") in hub.log or any(
            p.endswith("/adapter_model.safetensors") and p.startswith("/user/tiny-lora/") for _, p in hub.log)

        # Pushing again updates the same repository; a folder's own README is kept.
        (trained / "adapter" / "README.md").write_text("# my card\n")
        try:
            again = ftkit(["push", str(trained / "adapter"), "--repo", "user/tiny-lora", "-m", "second"], env)
        finally:
            (trained / "adapter" / "README.md").unlink()
        assert again["card"].startswith("kept") and repo["files"]["README.md"] == b"# my card\n"
        assert [c["summary"] for c in repo["commits"]][-1] == "second"


def test_push_errors(tmp_path, trained, tiny_model_dir):
    with Hub() as hub:
        env = hub_env(tmp_path, hub)
        bad = subprocess.run([sys.executable, "-m", "ftkit.cli", "push", str(trained), "--repo", "not a repo", "--json"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert bad.returncode == 2 and "user/name" in json.loads(bad.stdout)["error"]
        missing = subprocess.run([sys.executable, "-m", "ftkit.cli", "generate", "--model", str(tiny_model_dir), "--adapter",
                                  "user/absent", "--prompt", "x", "--json"], capture_output=True, text=True, env=env, timeout=120)
        assert missing.returncode == 2 and "user/absent" in json.loads(missing.stdout)["error"]
