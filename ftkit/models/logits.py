"""What a model does to its logits after the output head, read from its config.

The loss without full-vocabulary logits (the head applied at target positions only, or the loss inside
the head in chunks) starts from the head's output; a model that then scales or soft-caps its logits
(Cohere's logit_scale, Granite's logits_scaling, Gemma 2/3's final_logit_softcapping) must keep full
logits. A probe batch cannot be trusted to show it: on near-flat logits tanh soft-capping is the identity.
"""

from __future__ import annotations

from typing import Any

# key -> the value at which the transform does nothing
_TRANSFORMS = {"logit_scale": 1.0, "logits_scaling": 1.0, "final_logit_softcapping": None}


def final_transforms(config: dict[str, Any]) -> list[str]:
    """The config keys (nested text_config included) that transform the logits after the head."""
    found = []
    for cfg in (config, config.get("text_config") or {}):
        for key, neutral in _TRANSFORMS.items():
            if cfg.get(key) not in (None, neutral, 0, 0.0):
                found.append(key)
    return sorted(set(found))
