r"""Relevance rules for transformers: gradient × input with the non-linear gates held constant.

In gradient × input form the relevance of a tensor ``z`` is ``R_z = z ⊙ ∂̃f/∂z``, where ``∂̃`` is the
gradient with these rules (Ali et al., "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML 2022). Each treats one non-linear factor as a constant, which makes the propagation
conservative (``Σ R_in = Σ R_out`` up to biases) and keeps it linear in the seed:

* :class:`LayerNormHeld` (LN-rule): ``y = (x − μ)/σ · w + b`` with ``σ`` constant:
  ``∂̃y/∂x · g = (w ⊙ g − mean(w ⊙ g)) / σ``;
* :class:`GELUHeld`: ``GELU(x) = x Φ(x)`` with the gate ``Φ(x)`` constant: ``∂̃ · g = Φ(x) ⊙ g``;
* the attention probabilities held constant (AH-rule): ``AttentionCapture(hold_attention=True)``.

Every rule has an ``enabled`` attribute, so a method can run a plain and a relevance backward pass over
one graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from backprop_hooks.rule import Rule
from backprop_hooks.errors import RuleError


class _Held(Rule):
    linear = True

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def forward(self, module, inputs, output):
        self.ctx.x = inputs[0].detach()

    def held(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, module, grad_input, grad_output):
        if not self.enabled or grad_input[0] is None or grad_output[0] is None:
            return None
        return (self.held(module, self.ctx.x, grad_output[0]),) + tuple(grad_input[1:])


class LayerNormHeld(_Held):
    """LN-rule: back-propagate through ``nn.LayerNorm`` with the standard deviation held constant."""

    def check(self, module):
        if not isinstance(module, nn.LayerNorm):
            raise RuleError(f"LayerNormHeld handles nn.LayerNorm, not {type(module).__name__}")

    def held(self, module, x, g):
        dims = tuple(range(-len(module.normalized_shape), 0))
        std = (x.var(dim=dims, unbiased=False, keepdim=True) + module.eps).sqrt()
        wg = g * module.weight if module.weight is not None else g
        return (wg - wg.mean(dim=dims, keepdim=True)) / std


class GELUHeld(_Held):
    """Back-propagate through ``nn.GELU`` as ``x ↦ Φ(x)·x`` with the gate ``Φ(x)`` held constant."""

    def check(self, module):
        if not isinstance(module, nn.GELU):
            raise RuleError(f"GELUHeld handles nn.GELU, not {type(module).__name__}")

    def held(self, module, x, g):
        if module.approximate == "tanh":
            gate = 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        else:
            gate = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        return gate * g
