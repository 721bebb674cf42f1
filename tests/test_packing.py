"""Packing and length grouping change the speed, never what is learned.

A packed micro-batch (several examples per row, attention kept inside each) must give the same
per-step loss and gradients as the padded one on both backends, with completion-only masks and with
the output head computed only where there are targets; length grouping must still show every example
exactly once per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ftkit.common.distributed import World
from ftkit.data import batching
from ftkit.data.batch import Example, make_batch
from ftkit.data.packing import (
    pack_rows,
    packed_batch,
    packed_micro_batches,
    segment_ids,
)


def examples(lengths: list[int], seed: int = 0, completion: bool = True) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(5, 400, size=n).tolist()
        prompt = n // 2 if completion else 0
        out.append(Example(ids, [0] * prompt + [1] * (n - prompt)))
    return out


# ---------------------------------------------------------------------------- packing arithmetic


def test_rows_hold_every_example_once_within_capacity():
    lengths = [50, 7, 33, 50, 12, 9, 40, 18, 3, 25]
    rows = pack_rows(lengths, 50)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 50 for row in rows)
    assert len(rows) == 5  # 247 tokens: the fewest rows of 50 there can be
    assert pack_rows(lengths, 50) == rows  # deterministic: every process packs alike


def test_a_packed_batch_lays_examples_end_to_end_with_restarting_positions():
    ex = examples([5, 3, 4], completion=True)
    b = packed_batch(ex, [[0, 1], [2]], pad_id=0)
    assert b.inputs.shape == (2, 6)  # (5 - 1) + (3 - 1) tokens in the first row
    assert b.positions[0].tolist() == [0, 1, 2, 3, 0, 1] and b.positions[1].tolist() == [0, 1, 2, 0, 1, 2]
    assert b.inputs[0].tolist() == ex[0].ids[:-1] + ex[1].ids[:-1]
    assert b.targets[0].tolist() == ex[0].ids[1:] + ex[1].ids[1:]
    assert b.mask[0].tolist() == ex[0].mask[1:] + ex[1].mask[1:]
    assert b.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0] and b.mask[1, 3:].sum() == 0
    assert segment_ids(b.positions).tolist() == [[1, 1, 1, 1, 2, 2], [1, 1, 1, 2, 2, 2]]  # padding: a block of its own
    unpacked = make_batch(ex, 0)
    assert (b.n_targets, b.n_tokens) == (unpacked.n_targets, unpacked.n_tokens)


def test_packed_micro_batches_are_never_larger_than_the_padded_longest():
    ex = examples([60, 10, 20, 30, 15, 55, 5, 25])
    batches = packed_micro_batches(ex, batch_size=2, pad_id=0)
    assert all(b.inputs.shape[0] <= 2 and b.inputs.shape[1] <= 59 for b in batches)
    assert sum(b.inputs.size for b in batches) < sum(make_batch(ex[j:j + 2], 0).inputs.size for j in range(0, 8, 2))
    assert sum(b.n_targets for b in batches) == sum(sum(e.mask[1:]) for e in ex)


def test_rows_of_one_example_each_are_a_plain_padded_batch():
    """Examples that cannot share a row (two of the longest) become a padded batch: no positions."""
    ex = examples([9, 9, 3, 2])
    mbs = packed_micro_batches(ex, 2, 0)
    singles = [b for b in mbs if b.positions is None]
    assert len(singles) == 1 and singles[0].inputs.shape == (2, 8)
    np.testing.assert_array_equal(singles[0].inputs, make_batch(ex[:2], 0).inputs)
    assert any(b.positions is not None for b in mbs)  # 3 + 2 share a row


def test_every_process_runs_as_many_micro_batches():
    ex = examples([40, 5, 5, 5, 5, 38])
    shares = [batching.share(ex, 2, 0, True, World(r, 2)) for r in range(2)]
    assert shares[0].runs == shares[1].runs == max(len(s.batches) for s in shares)
    assert sum(b.n_targets for s in shares for b in s.batches) == shares[0].targets
    lone = batching.share(ex[:1], 2, 0, True, World(1, 2))  # one example, two processes
    assert lone.batches == [] and lone.runs == 1 and lone.filler() is not None


# ---------------------------------------------------------------------------- length grouping


def test_length_grouping_keeps_every_example_once_per_epoch_and_groups_lengths():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 500, size=1000).tolist()
    plain = batching.step_indices(1000, 7, 0, 3000, None)
    grouped = batching.step_indices(1000, 7, 0, 3000, lengths, step_size=8)
    for epoch in range(3):
        assert sorted(grouped[epoch * 1000:(epoch + 1) * 1000]) == list(range(1000))
    assert batching.step_indices(1000, 7, 1336, 16, lengths, step_size=8) == grouped[1336:1352]  # resumable anywhere
    assert grouped[:1000] != plain[:1000]

    def padding(order: list[int], step: int = 8) -> int:
        return sum(max(lengths[i] for i in order[j:j + step]) * step - sum(lengths[i] for i in order[j:j + step])
                   for j in range(0, 992, step))

    assert padding(grouped[:1000]) < padding(plain[:1000]) / 5


# ---------------------------------------------------------------------------- the same loss and gradients


def chat_examples(tokenizer_dir: Path, n: int) -> list[Example]:
    """Real chat rows (WikiSQL questions as user turns), loss on the assistant turns only."""
    from builders import WIKISQL
    from transformers import AutoTokenizer

    from ftkit.data.encode import encode
    from ftkit.recipe.schema import DataSection

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = DataSection(path="-")
    rows = [json.loads(line)["text"] for line in (WIKISQL / "train.jsonl").read_text().splitlines()[:n]]
    out = []
    for text in rows:
        q, a = text.split("\nA: ", 1) if "\nA: " in text else (text[: len(text) // 2], text[len(text) // 2:])
        out.append(encode({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                          "chat", "completion", tok, data))
    assert len({len(e.ids) for e in out}) > 3 and all(0 < sum(e.mask) < len(e.ids) for e in out)
    return out


def torch_grads(model_dir: Path, batches, scale: float, logits_at: str = "targets", chunk_elements: int | None = None
                ) -> tuple[float, dict[str, np.ndarray]]:
    from ftkit.backend.registry import get_backend

    be = get_backend("torch")
    be.load(tiny_recipe(model_dir), model_dir, adapter=None, train=True)
    be.set_adapter_tensors({k: np.full_like(v, 0.01) for k, v in be.adapter_tensors().items()})  # B != 0
    be.start_training()
    assert be.logits_at == "targets" and be.head_loss.enabled  # what transformers 5 gives: check the default
    be.logits_at = logits_at
    if chunk_elements is not None:  # as if the logits were large: the loss inside the head, in chunks
        import ftkit_torch.loss

        old, ftkit_torch.loss.CHUNK_ELEMENTS = ftkit_torch.loss.CHUNK_ELEMENTS, chunk_elements
        be.head_loss.chunk_tokens = max(1, chunk_elements // be.head_loss.vocab)
    try:
        loss = sum(float(be.forward_backward(b, scale)) for b in batches)
    finally:
        if chunk_elements is not None:
            ftkit_torch.loss.CHUNK_ELEMENTS = old
    return loss, {n: p.grad.numpy().copy() for n, p in be.model.named_parameters() if p.requires_grad}


def mlx_grads(model_dir: Path, batches, scale: float, head_at_targets: bool = True) -> tuple[float, dict[str, np.ndarray]]:
    from mlx.utils import tree_flatten

    from ftkit.backend.registry import get_backend

    be = get_backend("mlx")
    be.load(tiny_recipe(model_dir), model_dir, adapter=None, train=True)
    assert be.head is not None  # the tiny Llama passes the probe: check the default
    if not head_at_targets:
        be.head = None
    be.set_adapter_tensors({k: np.full_like(v, 0.01) for k, v in be.adapter_tensors().items()})
    loss = sum(float(be.forward_backward(b, scale).item()) for b in batches)
    return loss, {k: np.array(v) for k, v in tree_flatten(be.grads)}


def tiny_recipe(model_dir: Path):
    from ftkit.recipe.load import build_recipe

    return build_recipe({"model": {"path": str(model_dir)}, "data": {"path": "-"},
                         "method": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
                         "torch": {"precision": "fp32"}}, "test", check_paths=False)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_packed_batches_give_the_padded_loss_and_gradients(backend, tiny_model_dir):
    pytest.importorskip(backend)
    ex = chat_examples(tiny_model_dir, 12)
    padded = [make_batch(ex[j:j + 4], 0) for j in range(0, 12, 4)]
    packed = packed_micro_batches(ex, 4, 0)
    assert len(packed) < len(padded) or sum(b.inputs.size for b in packed) < sum(b.inputs.size for b in padded)
    scale = 1.0 / sum(b.n_targets for b in padded)
    grads = torch_grads if backend == "torch" else mlx_grads
    loss_a, ga = grads(tiny_model_dir, padded, scale)
    loss_b, gb = grads(tiny_model_dir, packed, scale)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert ga.keys() == gb.keys() and all(np.abs(g).max() > 0 for g in ga.values())
    for k in ga:
        np.testing.assert_allclose(gb[k], ga[k], rtol=1e-4, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("how", ["columns", "targets", "chunked"])
def test_the_output_head_only_at_target_positions_gives_the_same_loss_and_gradients(tiny_model_dir, how):
    pytest.importorskip("torch")
    ex = chat_examples(tiny_model_dir, 8)
    batches = packed_micro_batches(ex, 4, 0) + [make_batch(ex[:3], 0)]
    assert any(not b.mask.any(axis=0).all() for b in batches)  # some columns have no target: selection happens
    scale = 1.0 / sum(b.n_targets for b in batches)
    loss_all, g_all = torch_grads(tiny_model_dir, batches, scale, logits_at="all")
    # "chunked": 3 tokens' logits per chunk, recomputed in the backward pass
    loss_sel, g_sel = torch_grads(tiny_model_dir, batches, scale, logits_at="targets" if how == "chunked" else how,
                                  chunk_elements=3 * 518 if how == "chunked" else None)
    assert loss_sel == pytest.approx(loss_all, rel=1e-6)
    for k in g_all:
        np.testing.assert_allclose(g_sel[k], g_all[k], rtol=1e-5, atol=1e-8, err_msg=k)


def test_mlx_output_head_only_at_target_positions_gives_the_same_loss_and_gradients(tiny_model_dir):
    pytest.importorskip("mlx")
    ex = chat_examples(tiny_model_dir, 8)
    batches = packed_micro_batches(ex, 4, 0) + [make_batch(ex[:3], 0)]
    scale = 1.0 / sum(b.n_targets for b in batches)
    loss_all, g_all = mlx_grads(tiny_model_dir, batches, scale, head_at_targets=False)
    loss_sel, g_sel = mlx_grads(tiny_model_dir, batches, scale)
    assert loss_sel == pytest.approx(loss_all, rel=1e-6)
    for k in g_all:
        np.testing.assert_allclose(g_sel[k], g_all[k], rtol=1e-5, atol=1e-8, err_msg=k)


def test_training_packed_or_padded_ends_with_the_same_adapter(tmp_path, tiny_model_dir, small_data):
    pytest.importorskip("torch")
    from builders import recipe_file
    from safetensors.numpy import load_file

    from ftkit.recipe.load import load_recipes
    from ftkit.train.loop import Trainer
    from ftkit.train.prepare import prepare

    out = {}
    for packing in ("on", "off"):
        p = recipe_file(tmp_path, tiny_model_dir, small_data, packing, data={"packing": packing},
                        train={"iters": 4, "save_every": 4, "grad_accum": 2, "batch_size": 3})
        (r,) = load_recipes([p])
        res = Trainer(prepare(r), "torch", quiet=True).run()
        out[packing] = (res, load_file(str(res.adapter / "adapter_model.safetensors")))
    (on, ta), (off, tb) = out["on"], out["off"]
    assert on.last_valid_loss == pytest.approx(off.last_valid_loss, rel=1e-5)
    assert on.trained_tokens == off.trained_tokens
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_chunked_linear_cross_entropy_gives_the_plain_loss_and_gradients(dtype):
    """Gradients taken in the forward pass, chunk by chunk: the same as full logits, for hidden states,
    a trainable head (full fine-tuning) and its bias."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from ftkit_torch.loss import linear_cross_entropy

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=g).to(dt).requires_grad_()
    weight = (torch.randn(37, 16, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(37, generator=g) * 0.1).requires_grad_()
    targets = torch.randint(0, 37, (11,), generator=g)
    ref = F.cross_entropy(F.linear(hidden.float(), weight, bias), targets, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.5, (hidden, weight, bias))
    got = linear_cross_entropy(hidden, weight, bias, targets, 4)  # 3 chunks, the last one short
    got_grads = torch.autograd.grad(got * 0.5, (hidden, weight, bias))
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert float(got) == pytest.approx(float(ref), rel=tol)
    for a, b in zip(got_grads, ref_grads):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a.float().numpy(), b.float().numpy(), rtol=tol, atol=tol * 0.1)
    if dtype == "float32":  # any other head: each chunk's logits recomputed in the backward pass
        from ftkit_torch.loss import chunked_cross_entropy

        head = lambda h: F.linear(h, weight, bias)  # noqa: E731
        again = chunked_cross_entropy(head, hidden, targets, 4)
        for a, b in zip(torch.autograd.grad(again * 0.5, (hidden, weight, bias)), ref_grads):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=tol, atol=tol * 0.1)
    with torch.no_grad():  # validation: the loss only
        assert float(linear_cross_entropy(hidden, weight, None, targets, 4)) == pytest.approx(
            float(F.cross_entropy(F.linear(hidden.float(), weight), targets, reduction="sum")), rel=tol)
