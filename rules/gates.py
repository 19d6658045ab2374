r"""Held gates for activations given as modules of other libraries (Hugging Face's ``GELUActivation``,
``NewGELUActivation``, ``QuickGELUActivation``, ...): every activation of the form ``x ↦ gate(x)·x``.

:class:`GateHeld` back-propagates ``∂̃ · g = (out / x) ⊙ g``, the gate read off the module's own forward
(``0.5`` where ``x = 0``, the limit of every GELU variant), so it needs no knowledge of the formula: the rule
of :class:`~backprop_hooks.rules.vit_relevance.GELUHeld`, on any module.
"""

from __future__ import annotations

from .vit_relevance import GELUHeld


class GateHeld(GELUHeld):
    """``x ↦ gate(x)·x`` with the gate ``out/x`` held constant, on any module; ``enabled`` switches it on and off."""

    def check(self, module):
        pass
