r"""Held gates for activations given as modules of other libraries (Hugging Face's ``GELUActivation``,
``NewGELUActivation``, ``QuickGELUActivation``, ...): every activation of the form ``x ↦ gate(x)·x``.

:class:`GateHeld` back-propagates ``∂̃ · g = (out / x) ⊙ g``, the gate read off the module's own forward
(``0.5`` where ``x = 0``, the limit of every GELU variant), so it needs no knowledge of the formula. On
``nn.GELU`` it equals :class:`~backprop_hooks.rules.vit_relevance.GELUHeld` up to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from backprop_hooks.rule import Rule

# Hugging Face's activation modules of the form x ↦ gate(x)·x with gate(0) = 1/2
HF_GELUS = ("GELUActivation", "NewGELUActivation", "GELUTanh", "FastGELUActivation", "QuickGELUActivation")
HF_SILUS = ("SiLUActivation",)


def is_gated_activation(name: str, module: nn.Module) -> bool:
    """Selector: ``nn.GELU``, ``nn.SiLU`` and Hugging Face's GELU and SiLU modules (``x ↦ gate(x)·x``)."""
    return isinstance(module, (nn.GELU, nn.SiLU)) or type(module).__name__ in HF_GELUS + HF_SILUS


class GateHeld(Rule):
    """``x ↦ gate(x)·x`` with the gate ``out/x`` held constant; ``enabled`` switches it on and off.
    ``at_zero``: the gate where ``x = 0``, the limit of ``out/x`` (1/2 for every GELU and SiLU, 1 for tanh)."""

    linear = True

    def __init__(self, enabled: bool = True, at_zero: float = 0.5) -> None:
        self.enabled, self.at_zero = enabled, at_zero

    def forward(self, module, inputs, output):
        if isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            x, out = inputs[0].detach(), output.detach()
            safe = torch.where(x == 0, torch.ones_like(x), x)
            self.ctx.gate = torch.where(x == 0, torch.full_like(x, self.at_zero), out / safe)

    def backward(self, module, grad_input, grad_output):
        gate = getattr(self.ctx, "gate", None)
        if not self.enabled or gate is None or grad_input[0] is None or grad_output[0] is None:
            return None
        return (gate * grad_output[0],) + tuple(grad_input[1:])
