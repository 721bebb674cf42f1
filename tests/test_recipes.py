"""The ready recipes in recipes/ validate, and the multi-node one gives the documented launch line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from builders import REPO

from ftkit.common.hub import looks_like_hub_id
from ftkit.recipe.load import load_recipes

RECIPES = sorted((REPO / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_ready_recipe_validates(path):
    # Keys and types; model paths may be hub ids or folders that ./scripts/quickstart makes (models/).
    (recipe,) = load_recipes([path], check_paths=False)
    assert recipe.name == path.stem
    assert looks_like_hub_id(recipe.data.path) or Path(recipe.data.path).exists(), recipe.data.path


def test_the_three_node_recipe_launches_twelve_fsdp_processes():
    (recipe,) = load_recipes([REPO / "recipes" / "fsdp-3x4.toml"])
    assert (recipe.torch.distributed, recipe.model.quantize) == ("fsdp", "nf4")
    out = subprocess.run([sys.executable, "-m", "ftkit.cli", "launch", str(REPO / "recipes" / "fsdp-3x4.toml"),
                          "--nproc-per-node", "4", "--nnodes", "3", "--node-rank", "1", "--main-address", "10.0.0.1",
                          "--print-command"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert "--num_processes 12 --num_machines 3" in line and "--machine_rank 1 --main_process_ip 10.0.0.1" in line
    assert line.endswith(f"-m ftkit.cli train {REPO / 'recipes' / 'fsdp-3x4.toml'} --backend torch")
