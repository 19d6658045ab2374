r"""Held gates for activations given as modules of other libraries (Hugging Face's ``GELUActivation``,
``NewGELUActivation``, ``QuickGELUActivation``, ...): every activation of the form ``x ↦ gate(x)·x``.

:class:`GateHeld` back-propagates ``∂̃ · g = (out / x) ⊙ g``, the gate read off the module's own forward
(``at_zero`` where ``x = 0``: 0.5, the limit of every GELU and SiLU variant), so it needs no knowledge of the
formula: the rule of :class:`~backprop_hooks.rules.vit_relevance.GELUHeld`, on any module.
"""

from __future__ import annotations

from torch import nn

from .vit_relevance import GELUHeld

# Hugging Face's activation modules of the form x ↦ gate(x)·x with gate(0) = 1/2
HF_GELUS = ("GELUActivation", "NewGELUActivation", "GELUTanh", "FastGELUActivation", "QuickGELUActivation")
HF_SILUS = ("SiLUActivation",)


def is_gated_activation(name: str, module: nn.Module) -> bool:
    """Selector: ``nn.GELU``, ``nn.SiLU`` and Hugging Face's GELU and SiLU modules (``x ↦ gate(x)·x``)."""
    return isinstance(module, (nn.GELU, nn.SiLU)) or type(module).__name__ in HF_GELUS + HF_SILUS


class GateHeld(GELUHeld):
    """``x ↦ gate(x)·x`` with the gate ``out/x`` held constant, on any module; ``enabled`` switches it on and off.
    ``at_zero``: the gate where ``x = 0``, the limit of ``out/x`` (1/2 for every GELU and SiLU, 1 for tanh)."""

    def __init__(self, enabled: bool = True, at_zero: float = 0.5) -> None:
        super().__init__(enabled)
        self.at_zero = at_zero

    def check(self, module):
        pass
