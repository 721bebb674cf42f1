"""The training loss without a full-vocabulary logits tensor.

Two savings, both exact:
- the output head runs only at target positions (transformers' `logits_to_keep` with a boolean mask:
  the completion, the assistant turns), so prompt tokens cost no head matmul and no softmax;
- where those logits would still be large (long sequences x a big vocabulary), the loss is computed
  inside the head's forward, a chunk of tokens at a time: for a plain linear head each chunk's
  gradients are taken right away, so no logits are kept or recomputed (liger-kernel's fused linear
  cross-entropy instead on CUDA when it is installed); any other head recomputes each chunk's logits
  in the backward pass (activation checkpointing per chunk).

The head is reached through a forward override on the model's own output-embedding module, so its
parameter names, weight tying, PEFT and FSDP wrapping stay as they are. `HeadLoss.verify` checks on a
probe batch that this path gives the same loss as plain logits before it is used (a model whose
forward post-processes the logits, e.g. soft-capping, fails the check and keeps plain logits).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Logits elements per chunk (and the size below which no chunking is needed): 2^25 fp32 = 128 MiB.
CHUNK_ELEMENTS = 1 << 25


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of -log softmax(hidden @ weight.T + bias)[target], a chunk of tokens at a time.

    Each chunk's gradients (softmax minus one-hot, through the head) are computed in the forward pass,
    so the backward pass neither keeps nor recomputes any logits: one head matmul forward and one or two
    backward, as with full logits, in one chunk's memory (liger-kernel's fused linear cross-entropy does the
    same in Triton on CUDA).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        w = weight.to(hidden.dtype)  # as autocast would (once, not per chunk); a no-op when they match
        b = None if bias is None else bias.to(hidden.dtype)
        for a in range(0, hidden.shape[0], chunk_tokens):
            h, t = hidden[a : a + chunk_tokens], targets[a : a + chunk_tokens]
            logits = F.linear(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                d = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                d[torch.arange(len(t), device=d.device), t] -= 1.0
                d = d.to(h.dtype)
                if need_h:
                    grad_h[a : a + chunk_tokens] = d @ w
                if need_w:
                    grad_w += (d.t() @ h).float()
                if need_b:
                    grad_b += d.float().sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.needs = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.needs
        gh = next(saved) * grad_out if need_h else None  # a 0-d factor keeps the hidden states' dtype
        gw = (next(saved) * grad_out).to(ctx.dtypes[0]) if need_w else None
        gb = (next(saved) * grad_out).to(ctx.dtypes[1]) if need_b else None
        return gh, gw, gb, None, None


def linear_cross_entropy(hidden, weight, bias, targets, chunk_tokens: int) -> torch.Tensor:
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens)


def chunked_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """The same sum for any head module (one that is not a plain linear layer): each chunk's logits are
    recomputed in the backward pass instead of kept (activation checkpointing per chunk)."""

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, hidden.shape[0], chunk_tokens):
        total = total + checkpoint(part, hidden[a : a + chunk_tokens], targets[a : a + chunk_tokens], use_reentrant=False)
    return total


@functools.cache  # asked at every micro-batch: import (or fail to) once
def _liger():
    try:
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy,
        )
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


class HeadLoss:
    """Computes the loss inside the output head's forward when asked to (see the module docstring)."""

    def __init__(self, model, vocab_size: int):
        self.head = model.get_output_embeddings()
        self.vocab = vocab_size
        self.chunk_tokens = max(1, CHUNK_ELEMENTS // vocab_size)
        self.enabled = self.head is not None
        self._targets: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        if self.enabled:
            self._plain = self.head.forward
            self.head.forward = self._forward

    def wanted(self, n_tokens: int) -> bool:
        """Worth it: the logits of `n_tokens` positions would not fit one chunk, or a fused kernel exists."""
        return self.enabled and (n_tokens * self.vocab > CHUNK_ELEMENTS or self._fused() is not None)

    def _fused(self):
        w = getattr(self.head, "weight", None)
        plain_linear = type(self.head) is torch.nn.Linear and self.head.bias is None
        return _liger() if plain_linear and w is not None and w.is_cuda else None

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._targets is None:
            return self._plain(hidden)
        targets, self._targets = self._targets, None
        h = hidden.reshape(-1, hidden.shape[-1])
        fused = self._fused()
        if fused is not None:
            self.loss = fused(h, self.head.weight, targets, reduction="sum").float()
        elif isinstance(self.head, torch.nn.Linear) and type(self.head).forward is torch.nn.Linear.forward:
            self.loss = linear_cross_entropy(h, self.head.weight, self.head.bias, targets, self.chunk_tokens)
        else:
            self.loss = chunked_cross_entropy(self._plain, h, targets, self.chunk_tokens)
        return hidden.new_zeros((*hidden.shape[:-1], 1))  # what the model returns as logits; unused

    def __call__(self, run, targets: torch.Tensor) -> torch.Tensor:
        """Run `run()` (the model's forward at the target positions) and return its summed loss."""
        self._targets, self.loss = targets, None
        try:
            run()
        finally:
            self._targets = None
        if self.loss is None:
            raise RuntimeError("the model's forward did not call its output head")
        return self.loss

    def verify(self, plain_loss, head_loss) -> None:
        """Keep this path only if it agrees with plain logits on a probe batch."""
        if not self.enabled:
            return
        a, b = float(plain_loss), float(head_loss)
        if abs(a - b) > 1e-3 * max(1.0, abs(a)):
            warnings.warn(f"the loss inside the output head ({b:.6g}) differs from plain logits ({a:.6g}) for this model; "
                          "ftkit computes full logits instead.", stacklevel=2)
            self.enabled = False
