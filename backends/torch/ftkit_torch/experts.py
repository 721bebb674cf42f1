"""A transformers 5 mixture-of-experts block's routed experts, as the core's selection sees them.

transformers 5 keeps each block's experts as 3-D parameters of one `...experts` module (not
`nn.Linear`s), which PEFT adapts through `target_parameters`; this lists them with their shapes.
"""

from __future__ import annotations

from ftkit.adapters.targets import EXPERT_PARAMS
from ftkit.common.errors import FtkitError


def _expert_params(name: str, module) -> dict[str, tuple[int, int, int]]:
    params = [(n, p) for n, p in module.named_parameters(recurse=False) if n in EXPERT_PARAMS and p.ndim == 3]
    if getattr(module, "is_transposed", False) or not params:
        return {}  # (experts, in, out) storage: not a layout ftkit's MLX side holds, so not offered
    order = [n for n, _ in params]
    if order != [n for n in EXPERT_PARAMS if n in order]:
        # PEFT names the adapter's tensors by this order; the core reads them back assuming EXPERT_PARAMS'.
        raise FtkitError(f"{name} ({type(module).__name__}) registers its expert parameters as {order}, not in the order "
                         f"{list(EXPERT_PARAMS)} ftkit's adapter layout expects; leave \"experts\" out of method.targets.")
    return {f"{name}.{n}": tuple(p.shape) for n, p in params}  # (experts, out, in)


def expert_shapes(model) -> dict[str, tuple[int, int, int]]:
    """(experts, out, in) of every routed-experts parameter, by transformers parameter path."""
    shapes: dict[str, tuple[int, int, int]] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "experts":
            shapes.update(_expert_params(name, module))
    return shapes
