import math

import pytest

from ftkit.recipe.schema import TrainSection
from ftkit.train.schedule import lr_at, make_schedule


def test_epochs_to_steps_and_axolotl_style_counts():
    t = TrainSection(epochs=2, batch_size=4, grad_accum=2, evals_per_epoch=4, saves_per_epoch=2)
    s = make_schedule(t, n_train=1000, n_valid=100)
    assert s.steps_per_epoch == 125  # ceil(1000 / 8)
    assert s.total_steps == 250
    assert s.steps_per_eval == 31  # int(125 / 4)
    assert s.save_every == 62
    assert s.val_batches is None  # the whole validation set
    assert s.steps_per_report == 2  # int(0.01 * 250)


def test_eval_proportion_of_total_sets_val_batches():
    t = TrainSection(epochs=1, batch_size=4, evals_per_epoch=2, eval_proportion_of_total=0.25)
    s = make_schedule(t, n_train=400, n_valid=100)
    assert s.val_batches == int(100 * 0.25 / 4) == 6


def test_mlx_tuning_fork_proportions_when_no_per_epoch_counts():
    t = TrainSection(iters=1000, validation_interval_proportion=0.2, validations_per_train_item=0.5,
                     reporting_interval_proportion=0.01, adapter_save_interval_proportion=0.1)
    s = make_schedule(t, n_train=10, n_valid=10)
    assert (s.steps_per_eval, s.val_batches, s.steps_per_report, s.save_every) == (200, 100, 10, 100)


def test_explicit_counts_win_and_nothing_is_zero():
    t = TrainSection(iters=3, steps_per_eval=7, save_every=2, val_batches=5)
    s = make_schedule(t, n_train=10, n_valid=10)
    assert (s.steps_per_eval, s.save_every, s.val_batches, s.steps_per_report) == (7, 2, 5, 1)
    assert s.is_eval(3) and s.is_report(3) and not s.is_save(3)  # the final adapter is saved anyway


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedule(kind):
    t = TrainSection(iters=100, lr=1e-3, warmup=10, scheduler=kind, min_lr_ratio=0.1)
    s = make_schedule(t, n_train=10, n_valid=0)
    lrs = [lr_at(i, t, s) for i in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup, never 0
    assert lrs[10] == pytest.approx(1e-3)
    if kind == "constant":
        assert lrs[-1] == pytest.approx(1e-3)
    else:
        assert 1e-4 < lrs[-1] < 1.2e-4  # decays towards min_lr_ratio * lr, last step not wasted at the floor
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    if kind == "cosine":
        mid = lr_at(55, t, s)
        assert mid == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 44 / 90)))


def test_warmup_fraction():
    t = TrainSection(iters=200, warmup=0.05)
    assert make_schedule(t, 10, 0).warmup_steps == 10
