"""The one-call API: :func:`explain` (any method x any target)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import methods
from .explanation import Explanation
from .validate import Classes, LogitsFn


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
