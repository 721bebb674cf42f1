"""The compiled MLX step ([mlx] compile, ftkit_mlx/step.py) computes what the eager step computes, bit for bit.

Its micro-batches are padded to bucketed lengths and its dropout masks drawn outside the graph; a
change to either that moved a single bit (e.g. masks drawn inside the graph, over the padded shape)
fails the exact comparisons here. The golden values (tests/test_golden.py) were pinned eagerly, and
the compiled step reproduces them.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from ftkit.data.batch import Example, make_batch  # noqa: E402
from ftkit.data.packing import packed_micro_batches  # noqa: E402


@pytest.fixture(autouse=True)
def mlx_on_cpu():
    """MLX's CPU device (a Mac would otherwise take the GPU): the bit-for-bit claims and the golden numbers are its."""
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


def backend(model_dir, compiled: bool, dropout: float = 0.1, **train):
    from ftkit.backend.registry import get_backend
    from ftkit.recipe.load import build_recipe

    recipe = build_recipe({"model": {"path": str(model_dir)}, "data": {"path": "-", "max_seq_length": 256},
                           "method": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": dropout},
                           "train": {"max_grad_norm": 0.05, "weight_decay": 0.1, "seed": 3, **train},
                           "mlx": {"compile": compiled}}, "t", check_paths=False)
    be = get_backend("mlx")
    be.load(recipe, model_dir, adapter=None, train=True)
    be.set_adapter_tensors({k: np.full_like(v, 0.01) for k, v in be.adapter_tensors().items()})  # B != 0
    be.start_training()
    return be


def examples(lengths: list[int], seed: int) -> list[Example]:
    """Token ids under the tiny tokenizer's vocabulary; the loss on the second half of each example."""
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(5, 400, size=n).tolist(), [0] * (n // 2) + [1] * (n - n // 2)) for n in lengths]


def steps() -> list[list]:
    """Three optimizer steps of two micro-batches each: packed rows, plain padded rows, varied lengths."""
    out = []
    for s, lengths in enumerate([[9, 23, 40, 17, 31, 12], [50, 8, 8, 33], [70, 45, 21, 64, 5, 30]]):
        ex = examples(lengths, seed=s)
        packed = packed_micro_batches(ex, 2, 0)
        out.append([packed[0], make_batch(ex[:3], 0)] if s != 1 else packed[:2])
    return out


def train(be, batches_per_step: list[list], nan_step: int | None = None) -> tuple[list[float], list]:
    """The micro-batches' losses, and each step's gradient norm and whether it was skipped (`nan_step`'s
    gradients are NaN: train.on_nonfinite = "skip" leaves the weights and the optimizer state)."""
    losses, stats = [], []
    for k, batches in enumerate(batches_per_step):
        scale = float("nan") if k == nan_step else 1.0 / sum(b.n_targets for b in batches)
        losses += [be.forward_backward(b, scale).item() for b in batches]
        out = be.optimizer_step(1e-2 * (k + 1), skip_nonfinite=True)
        stats.append((str(float(out["grad_norm"])), out["skipped"]))
    return losses, stats


def test_the_compiled_step_gives_the_eager_losses_norms_and_adapter_bit_for_bit(tiny_model_dir):
    batches = steps()
    assert any(b.positions is not None for s in batches for b in s) and any(b.positions is None for s in batches for b in s)
    eager = backend(tiny_model_dir, False)  # one after the other: MLX's generator is global, and loading seeds it
    got_e = train(eager, batches, nan_step=1)
    compiled = backend(tiny_model_dir, True)
    got_c = train(compiled, batches, nan_step=1)
    assert not eager.describe()["compiled_step"] and compiled.describe()["compiled_step"]
    assert [skipped for _, skipped in got_c[1]] == [False, True, False]
    assert got_c == got_e  # exact: losses of every micro-batch, the clipped steps' gradient norms, the skip
    a, b = eager.adapter_tensors(), compiled.adapter_tensors()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.allclose(v, 0.01) for v in b.values())  # it trained
    # One compiled function per (first micro-batch or not, rows, bucketed length and target count, packed or not).
    from ftkit_mlx.step import bucket

    shapes = set()
    for s in batches:
        for i, m in enumerate(s):
            rows, length = m.inputs.shape[0], bucket(m.inputs.shape[1])
            eighth = rows * length // 8
            shapes.add((i == 0, rows, length, -(-m.n_targets // eighth), m.positions is None))
    assert compiled.step.traces == len(shapes)


def test_the_compiled_step_reproduces_the_golden_lora_run(tmp_path, tiny_model_dir, monkeypatch):
    """tests/test_golden.py's MLX LoRA case (dropout, packing, accumulation, clipping, decay, a checkpoint and
    validation mid-run), compiled: its pinned losses, norms and checksum."""
    import builders
    import test_golden as golden

    monkeypatch.setattr(golden, "recipe_file", lambda *a, **kw: builders.recipe_file(*a, **kw, mlx={"compile": True}))
    got = golden.train_case(tmp_path, tiny_model_dir, golden.qa_data(tmp_path / "data"), "mlx", "lora")
    golden.check(("mlx", "lora"), got)


def flat_grads(be) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(be.grads)}


def test_dropout_masks_follow_the_eager_generator_whatever_the_padding(tiny_model_dir):
    """A micro-batch of 33-token rows, padded to 64: the compiled step's dropout gradients are the
    eager step's, and another seed gives other gradients (the masks are really drawn)."""
    batch = make_batch(examples([34, 20], seed=5), 0)
    grads = {}
    for name, compiled, seed in (("eager", False, 3), ("compiled", True, 3), ("other seed", True, 4)):
        be = backend(tiny_model_dir, compiled, seed=seed)
        be.forward_backward(batch, 0.1)
        grads[name] = flat_grads(be)
    assert all(np.array_equal(grads["eager"][k], grads["compiled"][k]) for k in grads["eager"])
    assert not all(np.array_equal(grads["eager"][k], grads["other seed"][k]) for k in grads["eager"])


def test_bucketing_keeps_the_compiled_shapes_few_and_bounded(tiny_model_dir, monkeypatch):
    from ftkit_mlx import step

    ns = range(1, 4097)
    sizes = [step.bucket(n) for n in ns]
    assert all(b >= n for n, b in zip(ns, sizes)) and sizes == sorted(sizes)
    assert all(b <= max(16 * -(-n // 16), n * 1.0625) for n, b in zip(ns, sizes))  # at most 6.25% more past 256
    assert len(set(sizes)) == 32 + 16 * 3  # 16..512 by 16, then 16 an octave up to 4096

    # Rows of 4 to 61 tokens, twenty lengths: four buckets (16 .. 64), each with a first micro-batch of two
    # rows and a second of one: eight compiled functions (the full-logits head: no target index to bucket).
    be = backend(tiny_model_dir, True)
    be.head = None
    for n in range(5, 63, 3):
        be.forward_backward(make_batch(examples([n, n], seed=n), 0), 0.01)
        be.forward_backward(make_batch(examples([n], seed=n + 1), 0), 0.01)
        be.step.grads = None
    assert be.step.traces == 8

    monkeypatch.setattr(step, "MAX_TRACES", 2)  # whatever the data, the least recently used go
    for n in (100, 130, 160):
        be.forward_backward(make_batch(examples([n], seed=n), 0), 0.01)
        be.step.grads = None
    assert be.step.traces == 2


def test_auto_leaves_the_cpu_eager_and_a_compiled_run_resumes_exactly(tmp_path, tiny_model_dir):
    """[mlx] compile = "auto" leaves MLX's CPU device eager (see ftkit_mlx/step.py for the measurement);
    a compiled run stopped after a checkpoint and resumed ends with the unbroken run's adapter, bytes and all."""
    from builders import recipe_file, wikisql_slice

    from ftkit.recipe.load import load_recipes
    from ftkit.train.loop import Trainer
    from ftkit.train.prepare import prepare

    data = wikisql_slice(tmp_path / "data", train=24, valid=8)
    assert not backend(tiny_model_dir, "auto").describe()["compiled_step"]  # the CPU device (see the fixture)

    def run(name: str, **kw):
        p = recipe_file(tmp_path, tiny_model_dir, data, name=name, method={"dropout": 0.1}, mlx={"compile": True},
                        train={"iters": 4, "batch_size": 2, "grad_accum": 2, "save_every": 2, "steps_per_eval": 100})
        (recipe,) = load_recipes([p])
        trainer = Trainer(prepare(recipe), "mlx", quiet=True)
        result = trainer.run(**kw)
        assert trainer.backend.describe()["compiled_step"]
        return result

    whole = run("whole")
    run("part", stop_after=3)  # as if preempted after step 3: the stop writes its checkpoint
    resumed = run("part", resume="auto")
    assert resumed.resumed_from.endswith("step-000003") and resumed.steps == 4
    name = "adapter_model.safetensors"
    assert (resumed.adapter / name).read_bytes() == (whole.adapter / name).read_bytes()
