"""The MLX training step: forward + backward + gradient accumulation, then the optimizer update, each
through `mx.compile` as mlx-lm compiles its own step (the model, the optimizer state and
`mx.random.state` as the graph's inputs and outputs, so a traced graph reads and writes the live
values), or eagerly ([mlx] compile; auto: compiled on Apple's GPU only). Both give the same numbers
on MLX's CPU device, bit for bit (tests/test_mlx_compile.py): its JIT fuses without FMA contraction,
and what follows keeps padding and dropout from changing anything.

Measured on this project's shared 2-core Linux CPU (mlx 0.32.4; about 3 GFLOP/s a float32 GEMM; load
average 4-9) the step is matrix-multiply bound and fusion saves nothing measurable: at one fixed shape
SmolLM2-135M took 23.1 s of CPU a step compiled against 22.4 s eager (128 tokens); through the loop on
WikiSQL (bench/mlx_compile.py) a 4-layer Llama took 1.87 s a step against 1.74 s (30 steps, 14
shapes) and SmolLM2 217 s against 215 s (3 steps). The first compiled step also builds MLX's fused
CPU kernels with the system compiler, once per machine (55 s with an empty $TMPDIR/mlx). Hence auto
leaves the CPU eager; Apple's GPU, where mlx-lm compiles its step too, is not measured here.

Shapes. A graph is traced once per input shape (shapeless tracing fails on mlx-lm's models: "Slice
cannot infer output shapes"), and packed rows change length from step to step, so the compiled path
pads each micro-batch's rows up to a bucket (`bucket`: a multiple of 16 up to 512, then 16 steps an
octave), and the index of its target positions up to an eighth of the rows' tokens (its padding
weighs 0). Padding comes after every real token of its row and has mask 0: causal (packed: per-example)
attention keeps real tokens from seeing it, and a padded token of a packed row is an example of its
own, so it never attends to nothing (no NaN). Each (shape, first micro-batch or not) gets its own
compiled function, at most MAX_TRACES of them, the least recently used dropped first.

Dropout. MLX draws a mask for the whole array at once, so a mask over a padded row differs from the
unpadded row's mask even where they overlap. The LoRA layers' dropout is therefore a `FedDropout`:
the step draws each mask eagerly at the unpadded shape, in the order the eager step draws them (the
forward pass, then, with gradient checkpointing, the backward pass's recomputation: one lazy pass
per new shape records that order), pads it, and feeds it to the compiled graph, so the generator
goes through the eager step's keys.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from ftkit.data.batch import Batch
from ftkit.recipe.schema import TrainSection
from ftkit_mlx import optim as mlx_optim

MAX_TRACES = 32

LossFn = Callable[..., mx.array]  # (tuned, *arrays) -> the sum of target-token losses


def wanted(setting: bool | str) -> bool:
    """[mlx] compile: true, false, or auto (compiled on Apple's GPU; the CPU steps eagerly, as measured above)."""
    return setting if isinstance(setting, bool) else mx.default_device().type == mx.DeviceType.gpu


def bucket(n: int) -> int:
    """`n` rounded up to a multiple of 16 up to 512, and beyond that to 16 steps an octave (at most 6.25%
    more tokens), so that the lengths of a run fall into few shapes (WikiSQL's rows at batch 4: 19 over an
    epoch's 250 steps, 6.8% more tokens; multiples of 32 gave 8 and 15%)."""
    step = max(16, 1 << max(0, n.bit_length() - 5))
    return -(-n // step) * step


class Arrays(NamedTuple):
    """What the loss reads from one micro-batch. `attention`: the packed rows' block-diagonal causal
    mask [B, 1, T, T] (None: one example per row, plain causal); `selected`: the flat target positions
    where the head runs (None: logits everywhere); `weights`: 1 per selected entry, 0 for padding
    (None: no padding)."""

    inputs: mx.array
    targets: mx.array
    mask: mx.array
    attention: mx.array | None = None
    selected: mx.array | None = None
    weights: mx.array | None = None


class Padding(NamedTuple):
    """How a micro-batch was padded: its rows' length and its number of selected targets, before and after."""

    length: int
    padded_length: int
    selected: int = 0
    padded_selected: int = 0

    def unpadded(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape a LoRA layer's input [rows, length, features] (or [selected, features] at the
        output head) has in the unpadded batch; None for a shape this padding does not explain."""
        if len(shape) == 3 and shape[1] == self.padded_length:
            return (shape[0], self.length, shape[2])
        if len(shape) == 2 and shape[0] == self.padded_selected:
            return (self.selected, shape[1])
        return None


def batch_arrays(batch: Batch, at_targets: bool, pad_to: int | None = None) -> tuple[Arrays, Padding]:
    """The micro-batch as MLX arrays, its rows right-padded to `pad_to` tokens when given."""
    inputs, targets, mask, positions = batch.inputs, batch.targets, batch.mask, batch.positions
    length = inputs.shape[1]
    extra = 0 if pad_to is None else max(0, pad_to - length)
    if extra:
        pad = ((0, 0), (0, extra))
        inputs, targets, mask = np.pad(inputs, pad), np.pad(targets, pad), np.pad(mask, pad)
        if positions is not None:  # all zeros: each padded token an example of its own
            positions = np.pad(positions, pad)
    attention = None if positions is None else mx.array(packed_mask(positions)[:, None])
    selected = weights = None
    n = n_padded = 0
    if at_targets and batch.n_targets < batch.mask.size:  # the head at target positions only (masks are 0/1)
        flat = np.flatnonzero(mask.reshape(-1) > 0).astype(np.int32)
        n = n_padded = len(flat)
        if pad_to is not None:  # an eighth of the rows' tokens at a time: at most eight shapes per row shape
            eighth = max(1, mask.size // 8)
            n_padded = min(-(-n // eighth) * eighth, mask.size)
            weights = mx.array((np.arange(n_padded) < n).astype(np.float32))
            flat = np.pad(flat, (0, n_padded - n))
        selected = mx.array(flat)
    arrays = Arrays(mx.array(inputs), mx.array(targets), mx.array(mask), attention, selected, weights)
    return arrays, Padding(length, length + extra, n, n_padded)


def packed_mask(positions: np.ndarray) -> np.ndarray:
    """[B, T, T]: token q attends to token k when k <= q in the same example of the row."""
    from ftkit.data.packing import segment_ids

    seg = segment_ids(positions)
    causal = np.tril(np.ones((positions.shape[1],) * 2, dtype=bool))
    return (seg[:, :, None] == seg[:, None, :]) & causal


class _Feed:
    """Where the FedDropout layers of one model find their masks: nowhere (draw inline, as nn.Dropout),
    a list to record their input shapes in, or the masks to use, in call order."""

    def __init__(self) -> None:
        self.shapes: list | None = None
        self.masks: list | None = None

    @contextmanager
    def set(self, shapes: list | None = None, masks: list | None = None):
        self.shapes, self.masks = shapes, None if masks is None else iter(masks)
        try:
            yield
        finally:
            self.shapes = self.masks = None


class FedDropout(nn.Dropout):
    """nn.Dropout, whose masks a compiled step may draw outside its graph (see the module docstring)."""

    def __init__(self, p: float, feed: _Feed):
        super().__init__(p)
        self._feed = feed

    def __call__(self, x: mx.array) -> mx.array:
        if self._p_1 == 1 or not self.training:
            return x
        feed = self._feed
        if feed.shapes is not None:
            feed.shapes.append((tuple(x.shape), self._p_1))
            return x
        mask = mx.random.bernoulli(self._p_1, x.shape) if feed.masks is None else next(feed.masks)
        return (mask * x) * (1 / self._p_1)


class Step:
    """Accumulates a step's gradients over its micro-batches and applies the update."""

    def __init__(self, tuned: nn.Module, optimizer, train: TrainSection, *, compiled: bool, max_length: int):
        self.tuned, self.optimizer, self.train, self.max_length = tuned, optimizer, train, max_length
        self.grads = None
        self._feed = _Feed()
        dropouts = [(path, m) for path, m in tuned.named_modules() if type(m) is nn.Dropout and m._p_1 < 1]
        self.compiled = compiled
        self._fed = compiled and bool(dropouts)
        if self._fed:
            found = dict(tuned.named_modules())
            for path, m in dropouts:
                parent, name = path.rsplit(".", 1)
                setattr(found[parent], name, FedDropout(1 - m._p_1, self._feed))
        self._traces: OrderedDict[tuple, tuple[Callable, list]] = OrderedDict()
        self._update = None
        self._update_for = None  # the optimizer state dict the compiled update was made for

    @property
    def traces(self) -> int:
        """Compiled forward-backward functions held now (one per bucketed shape)."""
        return len(self._traces)

    def arrays(self, batch: Batch, at_targets: bool) -> tuple[Arrays, Padding]:
        length = batch.inputs.shape[1]
        pad_to = max(length, min(bucket(length), self.max_length)) if self.compiled else None
        return batch_arrays(batch, at_targets, pad_to)

    # ------------------------------------------------------------------ forward + backward
    def backward(self, loss_fn: LossFn, arrays: tuple, scale: float, padding: Padding | None = None) -> mx.array:
        """Add the gradients of `scale * loss_fn(tuned, *arrays)` to the step's; return the unscaled
        loss, evaluated (the core reads it at the next report). `padding`: how `arrays` were padded
        (None: not at all)."""
        scale_ = mx.array(scale, mx.float32)  # as a Python float meets a float32 array eagerly
        masks = None
        if self.compiled:
            fn, shapes = self._traced(loss_fn, arrays)
            masks = self._masks(shapes, padding)
        if masks is not None:
            loss, self.grads = fn(arrays, masks, scale_, self.grads)
        else:  # eager: FedDropout draws inline
            loss, self.grads = _accumulate(self.tuned, loss_fn, arrays, scale_, self.grads)
        mx.eval(loss, self.grads)
        return loss

    def _traced(self, loss_fn: LossFn, arrays: tuple) -> tuple[Callable, list]:
        """The compiled function for this shape, and its dropout layers' input shapes in call order."""
        key = (getattr(loss_fn, "__func__", loss_fn), self.grads is None,
               tuple(None if a is None else (tuple(a.shape), a.dtype) for a in arrays))
        if key in self._traces:
            self._traces.move_to_end(key)
            return self._traces[key]
        shapes: list = []
        if self._fed:  # a lazy pass, never evaluated: the dropout layers' calls, backward recomputation included
            with self._feed.set(shapes=shapes):
                _accumulate(self.tuned, loss_fn, arrays, mx.array(1.0), None)
        tuned, feed = self.tuned, self._feed
        state = [tuned.state, mx.random.state]
        # Held weakly: a compiled function is never garbage-collected in a cycle (MLX's wrapper does not
        # take part in Python's cycle collection), and loss_fn may be a method of the step's owner.
        loss_ref = weakref.WeakMethod(loss_fn) if hasattr(loss_fn, "__self__") else lambda: loss_fn

        def step(arrays, masks, scale, prev):  # a new function object per key: its own compile cache
            with feed.set(masks=masks):
                return _accumulate(tuned, loss_ref(), arrays, scale, prev)

        # The model is an output too: nn.value_and_grad leaves the traced parameters in it, and the
        # outputs put the real ones back.
        self._traces[key] = (mx.compile(step, inputs=state, outputs=state), shapes)
        while len(self._traces) > MAX_TRACES:
            self._traces.popitem(last=False)
        return self._traces[key]

    @staticmethod
    def _masks(shapes: list, padding: Padding | None) -> list | None:
        """Each dropout layer's mask, drawn as the eager step draws it and padded; None when a shape
        does not come from this padding (the micro-batch then steps eagerly)."""
        masks = []
        for shape, keep in shapes:
            real = shape if padding is None else padding.unpadded(shape)
            if real is None:
                return None
            mask = mx.random.bernoulli(keep, real)
            masks.append(mask if real == shape else mx.pad(mask, [(0, s - r) for s, r in zip(shape, real)]))
        return masks

    # ------------------------------------------------------------------ update
    def update(self, lr: float, skip_nonfinite: bool) -> tuple[mx.array, bool]:
        """Clip, decay and step at `lr`; (the gradient norm, whether the step was skipped). Skipped:
        non-finite gradients under `skip_nonfinite`; the weights and the optimizer state stay."""
        grads, self.grads = self.grads, None
        if not self.compiled:
            norm = mlx_optim.global_norm(grads)
            if skip_nonfinite and not mx.isfinite(norm).item():
                return norm, True
            _apply(self.tuned, self.optimizer, self.train, grads, norm, lr, 1 - lr * self.train.weight_decay)
            mx.eval(self.tuned.trainable_parameters(), self.optimizer.state)
            return norm, False
        if not self.optimizer._initialized:  # set up outside the trace (after load_state, too)
            self.optimizer.init(self.tuned.trainable_parameters())
        if self._update is None or self._update_for is not self.optimizer.state:
            state = [self.tuned.state, self.optimizer.state]
            train, tuned, optimizer = self.train, self.tuned, self.optimizer
            self._norm = mx.compile(lambda g: mlx_optim.global_norm(g))  # noqa: PLW0108 - its own function: MLX keys its cache by function
            self._update = mx.compile(lambda g, n, d: _apply(tuned, optimizer, train, g, n, None, d), inputs=state, outputs=state)
            self._update_for = self.optimizer.state
        norm = self._norm(grads)
        if skip_nonfinite and not mx.isfinite(norm).item():
            return norm, True
        self.optimizer.learning_rate = lr  # optimizer state: an input of the compiled update
        self._update(grads, norm, mx.array(1 - lr * self.train.weight_decay))
        mx.eval(self.tuned.trainable_parameters(), self.optimizer.state)
        return norm, False


def _accumulate(tuned: nn.Module, loss_fn: LossFn, arrays: tuple, scale: mx.array, prev):
    def scaled(model, arrays):
        loss = loss_fn(model, *arrays)
        return loss * scale, loss

    (_, loss), grads = nn.value_and_grad(tuned, scaled)(tuned, arrays)
    return loss, grads if prev is None else tree_map(mx.add, prev, grads)


def _apply(tuned: nn.Module, optimizer, train: TrainSection, grads, norm: mx.array, lr: float | None,
           decay: float | mx.array) -> None:
    """Clip to train.max_grad_norm, decay (`decay` = 1 - lr * weight_decay), step: the optimizer's learning
    rate is set already when `lr` is None (inside a compiled update)."""
    if train.max_grad_norm:
        factor = mx.minimum(train.max_grad_norm / (norm + 1e-6), 1.0)  # torch's clip_grad_norm_
        grads = tree_map(lambda g: g * factor, grads)
    params, grads = mlx_optim.apply_weight_decay(train, tuned.trainable_parameters(), grads, decay)
    tuned.update(params)
    if lr is not None:
        optimizer.learning_rate = lr
    optimizer.update(tuned, grads)
