"""Models that scale or soft-cap their logits after the output head keep full logits on both backends:
the loss from the head's output alone would skip the transform (a probe on near-flat logits cannot see
tanh soft-capping, so the decision comes from the config)."""

from __future__ import annotations

import pytest
from builders import recipe_file

from ftkit.models.logits import final_transforms


def test_the_transforms_are_read_from_the_config():
    assert final_transforms({"model_type": "cohere", "logit_scale": 0.0625}) == ["logit_scale"]
    assert final_transforms({"final_logit_softcapping": 30.0}) == ["final_logit_softcapping"]
    assert final_transforms({"text_config": {"final_logit_softcapping": 30.0}}) == ["final_logit_softcapping"]
    assert final_transforms({"logits_scaling": 1.0, "final_logit_softcapping": None}) == []
    assert final_transforms({"model_type": "llama"}) == []


@pytest.mark.parametrize("family", ["cohere", "gemma2", "granite", "llama"])
def test_the_head_only_loss_is_off_where_logits_are_transformed(tmp_path, tokenizer_dir, small_data, family):
    pytest.importorskip("torch")
    pytest.importorskip("mlx_lm")
    from families import build_family

    from ftkit.backend.registry import get_backend
    from ftkit.recipe.load import load_recipes

    folder = build_family(family, tmp_path / family, tokenizer_dir)
    recipe = load_recipes([recipe_file(tmp_path, folder, small_data)])[0]
    transformed = family != "llama"
    torch_be = get_backend("torch")
    torch_be.load(recipe, folder, adapter=None, train=True)
    mlx_be = get_backend("mlx")
    mlx_be.load(recipe, folder, adapter=None, train=True)
    assert (torch_be.head_loss is None) == transformed
    assert (mlx_be.head is None) == transformed
