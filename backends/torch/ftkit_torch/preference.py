"""DPO and ORPO on the torch backend: each sequence's summed target log-probability, the frozen reference, the
pair step. The formulas are the core's (ftkit.backend.objectives.pair_terms) run on torch tensors.

The reference (DPO) is one of:
- an adapter method with no starting adapter: the same model with its adapter layers switched off (no extra memory);
- a starting adapter (method.resume_from, a previous stage): that folder loaded frozen beside the trained adapter
  under the name "reference" (a second small adapter in memory) and switched in for the reference pass;
- full fine-tuning: a second, frozen model in memory (the base at the recipe's model path, or the given folder),
  sharded like the policy under FSDP.

The adapters are switched on the tuner layers' own flags, not through PEFT's `disable_adapter()` / `set_adapter()`:
those also turn requires_grad off and on again on the trained adapter at every call, and FSDP2 reads requires_grad
when it first runs (which parameters it reduces, in which dtype) and autograd when a graph holds the parameters.
Flipping only the switches leaves the trained parameters, their optimizer state and the DDP/FSDP wrapping as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftkit.adapters import layout as adapter_layout
from ftkit.backend.objectives import Ops, Preference, pair_terms
from ftkit.common.errors import AdapterMismatchError, FtkitError
from ftkit.data.batch import PairBatch
from ftkit_torch import loss as head_loss

REFERENCE = "reference"  # the PEFT adapter name of a reference adapter loaded beside the trained one

TORCH_OPS = Ops(
    log_sigmoid=F.logsigmoid,
    log1mexp=lambda x: torch.log(-torch.expm1(x)),
    greater=lambda a, b: (a > b).float(),
    stop_gradient=lambda x: x.detach(),
)


@dataclass
class Reference:
    """What the reference pass runs: `model` inside `switch()`, without gradients or dropout."""

    label: str  # for the run's banner and describe()
    nbytes: int  # the memory it adds
    model: Any
    layers: list = field(default_factory=list)  # the policy's tuner layers to switch (adapter references)
    active: list[str] | None = None  # the adapter they apply during the pass; None: none

    @contextlib.contextmanager
    def switch(self):
        saved = [(m._active_adapter, m._disable_adapters) for m in self.layers]
        try:
            for m in self.layers:
                if self.active is None:
                    m._disable_adapters = True
                else:
                    m._active_adapter = self.active
            yield
        finally:
            for m, (active, disabled) in zip(self.layers, saved):
                m._active_adapter, m._disable_adapters = active, disabled


@contextlib.contextmanager
def no_dropout(module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def _tuner_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def build_reference(be, adapter: Path | None) -> Reference:
    recipe = be.recipe
    if recipe.method.kind == "full":
        return _model_copy(be, adapter)
    model = be._peft()
    if be.prompt_learning:
        raise FtkitError(f"method.kind = '{recipe.method.kind}' has no reference for DPO (virtual tokens cannot be switched "
                         "off per pass): use lora, dora or full.")
    if adapter is None:
        return Reference("the base model with the adapter switched off (no second copy)", 0, model, _tuner_layers(model))
    kind = adapter_layout.adapter_kind(adapter_layout.read_config(Path(adapter)))
    if kind not in ("lora", "dora"):
        raise AdapterMismatchError(f"{adapter}: a {kind} adapter cannot be the DPO reference of a {recipe.method.kind} run; "
                                   "give a LoRA/DoRA adapter folder, or none (the base with the adapter off).")
    if be.optimizer is not None and be.world.size > 1:
        raise FtkitError("set_reference(adapter) after start_training: the reference adapter joins the model's modules, so "
                         "it must be loaded before DDP/FSDP wrap them (call set_reference between load and start_training).")
    if REFERENCE in model.peft_config:
        model.delete_adapter(REFERENCE)
    was = model.training
    try:
        model.load_adapter(str(adapter), adapter_name=REFERENCE, is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise AdapterMismatchError(f"{adapter} (the DPO reference) does not fit this base model: "
                                   f"{str(e).splitlines()[0][:400]}") from None
    finally:
        model.train(was)  # PEFT's load_adapter leaves the model in eval mode
    loaded = [p for n, p in model.named_parameters() if f".{REFERENCE}." in n or n.endswith(f".{REFERENCE}")]
    for p in loaded:
        p.requires_grad_(False)
    return Reference(f"the adapter {adapter}, frozen", _nbytes(loaded), model, _tuner_layers(model), [REFERENCE])


def _model_copy(be, folder: Path | None) -> Reference:
    """Full fine-tuning: the starting weights as a second model, frozen, in the policy's dtype (so that step 0's
    rewards are exactly 0)."""
    from transformers import AutoModelForCausalLM

    from ftkit.models.resolve import resolve_model

    recipe = be.recipe
    path = Path(folder) if folder is not None else resolve_model(recipe.model.path, recipe.model.revision)
    kwargs: dict[str, Any] = {"dtype": next(be.model.parameters()).dtype, "trust_remote_code": recipe.model.trust_remote_code}
    attn = getattr(be.model.config, "_attn_implementation", None)
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        ref = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise FtkitError(f"{path} (the DPO reference): not a model folder this backend loads: {str(e).splitlines()[0][:400]}") from None
    ref.config.use_cache = False
    ref.requires_grad_(False)
    ref.eval()
    ref = ref.to(be.device)
    if be.sharded:
        from ftkit_torch import parallel

        ref = parallel.wrap(ref, "fsdp", be.device)
    what = "the base model" if folder is None else "the model"
    return Reference(f"{what} at {path}, a frozen copy", _nbytes(ref.parameters()), ref)


def reference_of(be) -> Reference:
    ref = getattr(be, "reference", None)
    if ref is not None:
        return ref
    if be.recipe.method.kind == "full":
        raise FtkitError("DPO with method.kind = 'full' needs its reference model loaded first (set_reference).")
    be.reference = build_reference(be, None)  # an adapter run that named none: the base, adapter off
    return be.reference


# ---------------------------------------------------------------------------------------------- log-probabilities
def _chunked_logps(head: Callable, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token log-probabilities through the output head a chunk of tokens at a time; with gradients each chunk's
    logits are recomputed in the backward pass instead of kept (as ftkit_torch.loss does for the SFT sum)."""

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(head(h).float(), t, reduction="none")

    grad = torch.is_grad_enabled()
    out = []
    for a in range(0, hidden.shape[0], chunk):
        h, t = hidden[a : a + chunk], targets[a : a + chunk]
        out.append(checkpoint(part, h, t, use_reentrant=False) if grad else part(h, t))
    return torch.cat(out)


def _logps_inside_head(model, run: Callable[[], Any], targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Run the model with its output head replaced, for this call, by `_chunked_logps` at `targets`."""
    head = model.get_output_embeddings()
    own = "forward" in head.__dict__  # HeadLoss's pass-through, or the module's class method
    inner = head.forward
    out: dict[str, torch.Tensor] = {}

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        out["logps"] = _chunked_logps(inner, hidden.reshape(-1, hidden.shape[-1]), targets, chunk)
        return hidden.new_zeros((*hidden.shape[:-1], 1))  # what the model returns as logits; unused

    head.forward = forward
    try:
        run()
    finally:
        if own:
            head.forward = inner
        else:
            del head.forward
    if "logps" not in out:
        raise RuntimeError("the model's forward did not call its output head")
    return out["logps"]


def sequence_sums(be, model, pb: PairBatch) -> torch.Tensor:
    """float32 [2 x pairs]: each sequence's summed target-token log-probability under `model` (the autograd graph
    kept when gradients are on). The head runs only where the SFT loss runs it (ftkit_torch.backend._loss_sum)."""
    batch = pb.batch
    kwargs = be._model_inputs(batch)
    selected = pb.sequence >= 0
    owner = be._tensor(pb.sequence[selected], torch.long)
    with be._autocast():
        if be.logits_at == "targets":
            kwargs["logits_to_keep"] = be._tensor(selected, torch.bool)
            wanted = be._tensor(batch.targets[selected], torch.long)
            hl = be.head_loss
            if hl is not None and hl.enabled and len(wanted) * hl.vocab > head_loss.CHUNK_ELEMENTS:
                per = _logps_inside_head(model, lambda: model(**kwargs), wanted, hl.chunk_tokens)
            else:
                per = -F.cross_entropy(model(**kwargs).logits.float(), wanted, reduction="none")
        else:
            targets, sel = batch.targets, selected
            keep = np.flatnonzero(selected.any(axis=0))
            if be.logits_at == "columns" and len(keep) < selected.shape[1]:
                kwargs["logits_to_keep"] = be._tensor(keep, torch.long)
                targets, sel = targets[:, keep], selected[:, keep]
            logits = model(**kwargs).logits[:, be.n_virtual :]
            # row-major over `sel`: the same order as pb.sequence[selected]
            per = -F.cross_entropy(logits[be._tensor(sel, torch.bool)].float(), be._tensor(targets[sel], torch.long), reduction="none")
    sums = torch.zeros(2 * pb.n_pairs, dtype=torch.float32, device=per.device)
    return sums.index_add(0, owner, per.float())


def reference_sums(be, pb: PairBatch) -> torch.Tensor:
    ref = reference_of(be)
    with torch.no_grad(), ref.switch(), no_dropout(ref.model):
        return sequence_sums(be, ref.model, pb)


def _preference(be) -> Preference:
    pref = Preference.of(be.recipe.train)
    if pref is None:
        raise FtkitError("pair_forward_backward: train.objective is 'sft'; preference pairs need 'dpo' or 'orpo'.")
    return pref


def pair_forward_backward(be, pb: PairBatch, scale: float, sync: bool) -> dict[str, torch.Tensor]:
    pref = _preference(be)
    tokens = be._tensor(pb.tokens_per_sequence, torch.float32)
    refs: tuple = ()
    if pref.uses_reference:  # first, so that no graph of the policy is alive while adapters are switched
        ref = reference_sums(be, pb)
        refs = (ref[0::2], ref[1::2])
    with be._gradient_sync(sync):
        lp = sequence_sums(be, be.train_model, pb)
        terms = pair_terms(TORCH_OPS, pref, lp[0::2], lp[1::2], tokens[0::2], tokens[1::2], *refs)
        loss = terms["loss"].sum()
        # `scale` is 1 / the step's pairs over all processes; DDP and FSDP average the processes' gradients.
        scaled = loss * (scale * be.world.size)
        (be.scaler.scale(scaled) if be.scaler else scaled).backward()
    return {name: terms[name].detach().sum() for name in pref.metric_names}


@torch.no_grad()
def sequence_logps(be, pb: PairBatch, reference: bool) -> np.ndarray:
    if reference:
        sums = reference_sums(be, pb)
    else:
        with no_dropout(be.model):
            sums = sequence_sums(be, be.model, pb)
    return sums.double().cpu().numpy()
