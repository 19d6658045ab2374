"""backprop_hooks: class-contrastive back-propagation explanations for PyTorch.

import backprop_hooks as bh
e = bh.explain(model, x, method="gradcam", target="weighted")
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import errors, targets
from .attach import Handle, attach
from .errors import BackpropHooksError
from .explanation import Explanation
from .rule import Rule
from .validate import Classes, LogitsFn

# Layers, lowest first: the core above, then the rules, the methods built from them, the test helpers.
from . import rules
from . import methods, testing
from .text import explain_text
from . import interop  # Captum, pytorch-grad-cam and Quantus adapters: imported only when used

__version__ = "0.1.0"


def explain(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "gradient",
    target: Any = "logit",
    classes: Classes = None,
    logits: Optional[LogitsFn] = None,
    **options: Any,
) -> Explanation:
    """Explain ``model`` at ``x`` with any method and any target, in one forward and one backward pass.

    ``classes=None`` explains the predicted class; ``options`` go to the method (``layer=...``,
    ``relu=...``, ``n_steps=...``). The logits are the model's output when it is a (B, C) tensor, its
    tensor ``.logits`` (Hugging Face) or its ``"logits"`` key; for anything else pass ``logits=fn``
    (output -> (B, C)), e.g. ``logits=lambda out: out.logits[:, -1]`` for a causal LM's next token.
    """
    return methods.get(method)(model, **options)(x, classes=classes, target=target, logits=logits)


__all__ = [
    "Rule",
    "attach",
    "Handle",
    "explain",
    "explain_text",
    "Explanation",
    "targets",
    "errors",
    "BackpropHooksError",
    "methods",
    "rules",
    "testing",
    "interop",
]
