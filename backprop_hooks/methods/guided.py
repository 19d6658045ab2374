r"""Modified-ReLU methods: Guided Backprop, Deconvnet and Guided Grad-CAM (none is linear in the seed).

* ``guided_backprop``: ``∂f/∂x`` with every ``nn.ReLU``'s backward replaced by ``relu(g) ⊙ [x > 0]``;
* ``deconvnet``:       the same with ``relu(g)`` (:mod:`backprop_hooks.rules.relu`);
* ``guided_gradcam``:  ``guided_backprop ⊙ upsample(gradcam)`` (Selvaraju et al. 2017), input-shaped.

A contrast seed is back-propagated as is, but the clamp makes the result differ from the per-class
composition: ``e.linear`` is ``False`` and a :class:`NonLinearContrastWarning` is emitted.

Functional activations: the rules sit on ``nn.ReLU`` modules, and hooks cannot see ``F.relu`` /
``torch.relu`` / ``Tensor.relu`` calls, whose backward would silently stay plain (``nn.ReLU6`` modules get
the rules too: the mask is then ``[0 < x < 6]``). The forward pass is
therefore watched for such calls (a ``TorchFunctionMode`` that only counts them): a model with no
``nn.ReLU`` at all raises :class:`~backprop_hooks.errors.RuleError` before any work, and a model where
some ReLUs are functional emits :class:`FunctionalReLUWarning`.

Guided Grad-CAM runs one forward and two backward passes: a partial one to the layer with the rules
switched off (the CAM weights need the unmodified gradient there), then the guided one to the input.
"""

from __future__ import annotations

import warnings
from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from backprop_hooks.rules.relu import RELU_TYPES, DeconvReLU, GuidedReLU, ReLURule

from ..errors import FunctionalReLUWarning, RuleError
from .base import Method, grad, register
from .cam import GradCAM, upsample

_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6}


def _is_relu6(func, args, kwargs) -> bool:
    """``F.hardtanh(x, 0, 6)``: what ``nn.ReLU6`` runs."""
    if func is not F.hardtanh:
        return False
    low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return low == 0 and high == 6


class _ReLUCalls(TorchFunctionMode):
    """Counts ReLU function calls (from ``nn.ReLU`` modules and functional ones alike); changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_FUNCTIONS or _is_relu6(func, args, kwargs or {}):
            self.count += 1
        return func(*args, **(kwargs or {}))


class ModifiedReLU(Method):
    """Input gradient with ``rule`` on every ``nn.ReLU`` (``rule_class``: a :mod:`backprop_hooks.rules.relu` rule)."""

    rule_class: Type[ReLURule]
    per_call = ("relu_rule",)

    def relu_rules(self):
        if not any(isinstance(m, RELU_TYPES) for m in self.model.modules()):
            raise RuleError(
                f"{self.name} needs nn.ReLU (or nn.ReLU6) modules, and {type(self.model).__name__} has none: "
                "functional "
                "F.relu / torch.relu calls cannot be hooked, so the result would be the plain gradient. "
                "Use nn.ReLU modules (e.g. self.act = nn.ReLU() in __init__, self.act(x) in forward)."
            )
        self.relu_rule = self.rule_class()
        return [(RELU_TYPES, self.relu_rule)]

    def rules(self, x):
        return self.relu_rules()

    def forward(self, x, classes, target):
        with _ReLUCalls() as seen:
            out = super().forward(x, classes, target)
        missed = seen.count - self.relu_rule.calls
        if missed > 0:
            warnings.warn(
                f"{self.name}: {missed} of {seen.count} ReLU calls in {type(self.model).__name__}'s forward are "
                "functional (F.relu / torch.relu / Tensor.relu) and keep their plain backward; only nn.ReLU "
                "modules get the modified rule",
                FunctionalReLUWarning,
                stacklevel=4,
            )
        return out

    def attribute(self, x, logits, seed):
        return grad(logits, x, seed)


@register
class GuidedBackprop(ModifiedReLU):
    """``∂f/∂x`` with every ReLU's backward ``relu(g) ⊙ [x > 0]`` (Springenberg et al. 2015)."""

    name = "guided_backprop"
    linear = False
    rule_class = GuidedReLU


@register
class Deconvnet(ModifiedReLU):
    """``∂f/∂x`` with every ReLU's backward ``relu(g)`` (Zeiler & Fergus 2014)."""

    name = "deconvnet"
    linear = False
    rule_class = DeconvReLU


@register
class GuidedGradCAM(GuidedBackprop):
    """``guided_backprop(x) ⊙ upsample(gradcam)`` (bilinear, broadcast over input channels).

    ``relu=True`` clamps the Grad-CAM factor at zero as in Selvaraju et al.; default signed.
    """

    name = "guided_gradcam"
    takes_layer = True

    def __init__(self, model: nn.Module, layer: Optional[str] = None, relu: bool = False, check_finite: bool = True):
        super().__init__(model, check_finite=check_finite)
        self.gradcam = GradCAM(model, layer=layer, relu=relu, check_finite=check_finite)

    @property
    def layer_name(self):
        return self.gradcam.layer_name

    def rules(self, x):
        return self.relu_rules() + list(self.gradcam.rules(x))

    def release(self) -> None:
        super().release()
        self.gradcam.release()

    def attribute(self, x, logits, seed):
        self.relu_rule.enabled = False
        try:
            cam = self.gradcam.layer_map(logits, seed, retain_graph=True)
        finally:
            self.relu_rule.enabled = True
        return grad(logits, x, seed) * upsample(cam, tuple(x.shape[2:]))[:, None]


__all__ = ["ModifiedReLU", "GuidedBackprop", "Deconvnet", "GuidedGradCAM", "FunctionalReLUWarning"]
