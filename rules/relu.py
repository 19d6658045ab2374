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

They sit on ReLU-like modules (:func:`is_relu_like`): ``nn.ReLU``, ``nn.ReLU6`` and any ``nn.Hardtanh`` clipping
at 0 (``min_val == 0``), in place or not. No activation is stored: GuidedReLU reads the mask from the
gradient autograd already computed, ``grad_input = g ⊙ m`` with the module's own local gradient mask
``m`` (``[x > 0]`` for ReLU, ``[0 < x < 6]`` for ReLU6; an in-place module that overwrote its input is
handled, autograd reads its output), and ``relu(g ⊙ m) = relu(g) ⊙ m``. So on ReLU6 Guided Backprop is
``relu(g) ⊙ [0 < x < 6]``: the module's local gradient, plus the positive-gradient clamp. Deconvnet ignores
the forward mask on every ReLU-like module: ``relu(g)``.

Smooth activations (``Hardswish``, ``SiLU``, ``GELU``, ``Mish``, ...) are not ReLU-like: they have no on/off
mask, Guided Backprop and Deconvnet define no rule for them, and the methods leave their backward plain
(:mod:`backprop_hooks.methods.guided` refuses a model with no ReLU-like module and warns about a mix).
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


RELU_LIKE = (nn.ReLU, nn.Hardtanh)  # Hardtanh: ReLU6 and other clips at 0, see is_relu_like


def is_relu_like(module: nn.Module) -> bool:
    """``nn.ReLU``, ``nn.ReLU6``, or an ``nn.Hardtanh`` whose lower clip is 0: a piecewise-linear unit whose
    local gradient is an on/off mask, which the modified-ReLU rules can clamp."""
    if isinstance(module, nn.ReLU):
        return True
    return isinstance(module, nn.Hardtanh) and float(module.min_val) == 0.0


def relu_like_selector(name: str, module: nn.Module) -> bool:
    """Selector for :func:`backprop_hooks.attach`: the modules :func:`is_relu_like` accepts."""
    return is_relu_like(module)


class ReLURule(Rule):
    """Base of the modified-ReLU rules: the ReLU-like check, a call counter, the ``enabled`` switch, and
    ``rule(masked, grad)`` giving the new input gradient."""

    def __init__(self) -> None:
        self.enabled = True
        self.calls = 0  # module calls seen (lets a method spot ReLUs that bypassed the hooks)

    def check(self, module: nn.Module) -> None:
        if not is_relu_like(module):
            raise RuleError(
                f"{type(self).__name__} handles ReLU-like modules only (nn.ReLU, nn.ReLU6, nn.Hardtanh clipping at "
                f"0), not {type(module).__name__}; select them, e.g. attach(model, {{relu_like_selector: rule}})"
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
    """``∂f/∂x = relu(g) ⊙ [x > 0]`` (Guided Backprop): only positive gradient through active units
    (``relu(g) ⊙ [0 < x < 6]`` on ReLU6: the module's own mask)."""

    linear = False

    def rule(self, masked, grad):
        return masked.clamp(min=0)


class DeconvReLU(ReLURule):
    """``∂f/∂x = relu(g)`` (Deconvnet): the ReLU is applied to the gradient, the forward mask ignored."""

    linear = False

    def rule(self, masked, grad):
        return grad.clamp(min=0)
