"""backprop_hooks: class-contrastive back-propagation explanations for PyTorch.

import backprop_hooks as bh
e = bh.explain(model, x, method="gradcam", target="weighted")
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import errors, targets
from .attach import Handle, attach
from .errors import BackpropHooksError
from .explanation import Explanation
from .rule import Rule
from .validate import Classes

# Layers, lowest first: the core above, then the rules, the methods built from them, the test helpers.
from . import rules
from . import methods, testing
from . import interop  # Captum, pytorch-grad-cam and Quantus adapters: imported only when used

__version__ = "0.1.0"


def explain(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "gradient",
    target: Any = "logit",
    classes: Classes = None,
    **options: Any,
) -> Explanation:
    """Explain ``model`` at ``x`` with any method and any target, in one forward and one backward pass.

    ``classes=None`` explains the predicted class; ``options`` go to the method (``layer=...``,
    ``relu=...``, ``n_steps=...``).
    """
    return methods.get(method)(model, **options)(x, classes=classes, target=target)


__all__ = [
    "Rule",
    "attach",
    "Handle",
    "explain",
    "Explanation",
    "targets",
    "errors",
    "BackpropHooksError",
    "methods",
    "rules",
    "testing",
    "interop",
]
