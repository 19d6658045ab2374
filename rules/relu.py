r"""Modified ReLU backward rules: ReLU removal, Guided Backprop, Deconvnet.

For a ReLU ``y = max(x, 0)`` with incoming gradient ``g = ∂f/∂y`` the rules return as ``∂f/∂x``:

=================  =====================================  =========================================
rule               backward                               linear in ``g``
=================  =====================================  =========================================
(plain autograd)   ``g ⊙ [x > 0]``                        yes
ReLUPassThrough    ``g``  ("ReLU removal")                yes
GuidedReLU         ``relu(g) ⊙ [x > 0]``                  no (Springenberg et al. 2015)
DeconvReLU         ``relu(g)``                            no (Zeiler & Fergus 2014)
=================  =====================================  =========================================

They sit on ``nn.ReLU`` and ``nn.ReLU6`` modules, in place or not (for ReLU6 the forward mask is
``[0 < x < 6]``, the gradient autograd gives it). No activation is stored: GuidedReLU reads the mask from
the gradient autograd already computed, ``grad_input = g ⊙ [y > 0]`` (the output's sign, so an in-place
ReLU that overwrote its input is handled), and ``relu(g ⊙ [y > 0]) = relu(g) ⊙ [y > 0]``.
Module hooks cannot see functional ``F.relu`` / ``torch.relu`` calls; the methods built from these rules
(:mod:`backprop_hooks.methods.guided`) detect them and refuse or warn.

``enabled = False`` turns a rule into plain autograd for the backward passes run meanwhile (Guided
Grad-CAM reads an unmodified gradient at a layer from the same forward pass).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from backprop_hooks.errors import RuleError
from backprop_hooks.rule import Grads, Rule


RELU_TYPES = (nn.ReLU, nn.ReLU6)


class ReLURule(Rule):
    """Base of the modified-ReLU rules: the nn.ReLU check, a call counter, the ``enabled`` switch, and
    ``rule(masked, grad)`` giving the new input gradient."""

    def __init__(self) -> None:
        self.enabled = True
        self.calls = 0  # module calls seen (lets a method spot ReLUs that bypassed the hooks)

    def check(self, module: nn.Module) -> None:
        if not isinstance(module, RELU_TYPES):
            raise RuleError(
                f"{type(self).__name__} handles nn.ReLU and nn.ReLU6 modules only, not {type(module).__name__}; "
                "select the ReLUs, e.g. attach(model, {nn.ReLU: rule})"
            )

    def forward(self, module, inputs, output):
        self.calls += 1
        return None

    def backward(self, module: nn.Module, grad_input: Grads, grad_output: Grads) -> Optional[Grads]:
        if not self.enabled or grad_input[0] is None or grad_output[0] is None:
            return None
        return (self.rule(grad_input[0], grad_output[0]),) + tuple(grad_input[1:])

    def rule(self, masked: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The new ``∂f/∂x`` from the plain one (``masked = g ⊙ [y > 0]``) and the incoming ``grad = g``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReLUPassThrough(ReLURule):
    """``∂f/∂x = g``: the ReLU's backward becomes the identity ("ReLU removal")."""

    linear = True

    def rule(self, masked, grad):
        return grad


class GuidedReLU(ReLURule):
    """``∂f/∂x = relu(g) ⊙ [x > 0]`` (Guided Backprop): only positive gradient through active units."""

    linear = False

    def rule(self, masked, grad):
        return masked.clamp(min=0)


class DeconvReLU(ReLURule):
    """``∂f/∂x = relu(g)`` (Deconvnet): the ReLU is applied to the gradient, the forward mask ignored."""

    linear = False

    def rule(self, masked, grad):
        return grad.clamp(min=0)
