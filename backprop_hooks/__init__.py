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

__version__ = "0.1.0"


def explain(model: nn.Module, x: torch.Tensor, method: str = "gradient", target: Any = "logit", classes: Classes = None, **options: Any) -> Explanation:
    """Explain ``model`` at ``x`` with any method and any target, in one forward and one backward pass.

    ``classes=None`` explains the predicted class; ``options`` go to the method (``layer=...``,
    ``relu=...``, ``n_steps=...``).
    """
    from . import methods

    return methods.get(method)(model, **options)(x, classes=classes, target=target)


def __getattr__(name: str):  # lazy: methods import rules, which import this package
    if name in ("methods", "testing"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Rule", "attach", "Handle", "explain", "Explanation", "targets", "errors", "BackpropHooksError", "methods", "testing"]
