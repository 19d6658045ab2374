r"""Relevance rules for transformers: gradient × input with the non-linear gates held constant.

In gradient × input form the relevance of a tensor ``z`` is ``R_z = z ⊙ ∂̃f/∂z``, where ``∂̃`` is the
gradient with these rules (Ali et al., "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML 2022). Each treats one non-linear factor as a constant, which makes the propagation
conservative (``Σ R_in = Σ R_out`` up to biases) and keeps it linear in the seed:

* :class:`LayerNormHeld` (LN-rule): ``y = (x − μ)/σ · w + b`` with ``σ`` constant:
  ``∂̃y/∂x · g = (w ⊙ g − mean(w ⊙ g)) / σ``;
* :class:`GELUHeld`: ``GELU(x) = x Φ(x)`` with the gate ``Φ(x)`` constant: ``∂̃ · g = Φ(x) ⊙ g``, the gate
  read off the module's own forward as ``out / x`` (``1/2`` at ``x = 0``, the limit);
* the attention probabilities held constant (AH-rule): ``AttentionCapture(hold_attention=True)``.

Every rule has an ``enabled`` attribute, so a method can run a plain and a relevance backward pass over one
graph. The module's output reaches the rest of the model through one autograd node per call: with the rule
off, the gradient enters the module's own graph (autograd's backward, unchanged); with it on, the node
hands the held gradient straight to the module's input and the module's own backward does not run (it
would be replaced anyway).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from backprop_hooks.errors import RuleError
from backprop_hooks.rule import Rule


class _HeldPath(torch.autograd.Function):
    """``out`` (the module's output) unchanged; backward: ``rule.enabled`` → ``rule.held(...)`` to the input and
    nothing into the module's graph, else the gradient into the module's graph as it is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, rule: "_Held", module: nn.Module) -> torch.Tensor:
        ctx.save_for_backward(x, out)
        ctx.rule, ctx.module = rule, module
        return out.detach()  # shares out's memory

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if not ctx.rule.enabled:
            return None, g, None, None
        x, out = ctx.saved_tensors
        held = ctx.rule.held(ctx.module, x, out, g) if ctx.needs_input_grad[0] else None
        return held, None, None, None


class _Held(Rule):
    linear = True
    needs_backward = False  # the held gradient lives in the graph (_HeldPath): no module gradient hooks

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def forward(self, module, inputs, output):
        x = inputs[0] if inputs else None
        if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and torch.is_grad_enabled()):
            return None
        if not (x.requires_grad or output.requires_grad):
            return None
        return _HeldPath.apply(x, output, self, module)

    def held(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor) -> Optional[torch.Tensor]:
        """The held gradient at the module's input for the output gradient ``g``."""
        raise NotImplementedError


class LayerNormHeld(_Held):
    """LN-rule: back-propagate through ``nn.LayerNorm`` with the standard deviation held constant."""

    def check(self, module):
        if not isinstance(module, nn.LayerNorm):
            raise RuleError(f"LayerNormHeld handles nn.LayerNorm, not {type(module).__name__}")

    def held(self, module, x, out, g):
        dims = tuple(range(-len(module.normalized_shape), 0))
        rstd = torch.native_layer_norm(x.detach(), module.normalized_shape, None, None, module.eps)[2]  # 1/σ
        wg = g * module.weight.detach() if module.weight is not None else g
        return (wg - wg.mean(dim=dims, keepdim=True)).mul_(rstd.to(wg.dtype))


def held_gate(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The gate ``out / x`` of an activation ``x ↦ gate(x)·x``, ``1/2`` where it is ``0/0`` (``x = 0``: every
    GELU's limit). One division and one pass over it: no mask is built."""
    return (out / x).nan_to_num_(nan=0.5)


class GELUHeld(_Held):
    """Back-propagate through ``nn.GELU`` as ``x ↦ Φ(x)·x`` with the gate ``Φ(x) = out/x`` held constant."""

    def check(self, module):
        if not isinstance(module, nn.GELU):
            raise RuleError(f"GELUHeld handles nn.GELU, not {type(module).__name__}")

    def held(self, module, x, out, g):
        return held_gate(x.detach(), out.detach()).mul_(g)


__all__ = ["LayerNormHeld", "GELUHeld", "held_gate"]
