r"""Modified-ReLU methods: Guided Backprop, Deconvnet and Guided Grad-CAM (none is linear in the seed).

* ``guided_backprop``: ``∂f/∂x`` with every ReLU-like module's backward replaced by ``relu(g) ⊙ [x > 0]``
  (``nn.ReLU``; on ``nn.ReLU6`` ``relu(g) ⊙ [0 < x < 6]``, its own mask, see :mod:`backprop_hooks.rules.relu`);
* ``deconvnet``:       the same with ``relu(g)`` (:mod:`backprop_hooks.rules.relu`);
* ``guided_gradcam``:  ``guided_backprop ⊙ upsample(gradcam)`` (Selvaraju et al. 2017), input-shaped.

A contrast seed is back-propagated as is, but the clamp makes the result differ from the per-class
composition: ``e.linear`` is ``False`` and a :class:`NonLinearContrastWarning` is emitted.

Which activations: the rules sit on ReLU-like modules (``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh`` clipping
at 0). Smooth activations (``Hardswish``, ``SiLU``, ``GELU``, ...) have no on/off mask and no guided rule:
their backward stays plain. A model with no ReLU-like module at all raises
:class:`~backprop_hooks.errors.RuleError` before any work (the message names the activations it found); a
model that mixes ReLU-like and smooth activations (MobileNetV3: ReLU and Hardswish) emits
:class:`FunctionalReLUWarning` saying that the smooth ones keep their plain backward.

Functional activations: hooks cannot see ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` / ``F.relu6`` calls,
whose backward would silently stay plain. The forward pass is therefore watched for such calls (an
:class:`~backprop_hooks.rules.intercept.Intercept` that only counts them); a model where some ReLUs are
functional emits :class:`FunctionalReLUWarning`.

Guided Grad-CAM runs one forward and two backward passes: a partial one to the layer with the rules
switched off (the CAM weights need the unmodified gradient there), then the guided one to the input.
"""

from __future__ import annotations

import warnings
from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from backprop_hooks.rules.intercept import Intercept
from backprop_hooks.rules.relu import DeconvReLU, GuidedReLU, ReLURule, is_relu_like, relu_like_selector

from ..errors import FunctionalReLUWarning, RuleError
from .base import Method, grad, register
from .cam import GradCAM, upsample

_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6}
_CLIP_FUNCTIONS = {F.hardtanh, F.hardtanh_}  # ReLU-like when the lower clip is 0 (nn.ReLU6 calls F.hardtanh)
SMOOTH_ACTIVATIONS = (nn.Hardswish, nn.SiLU, nn.GELU, nn.Mish, nn.ELU, nn.SELU, nn.Softplus, nn.LeakyReLU)


def _model_name(model: nn.Module) -> str:
    """The name users know the model by: its architecture (``efficientnet_lite0``), else its class."""
    return str(getattr(model, "arch", None) or type(model).__name__)


def activation_summary(model: nn.Module) -> Optional[str]:
    """None if ``model`` has ReLU-like modules the modified-ReLU rules can reach; else why not, in words
    that name the activations it has."""
    if any(is_relu_like(m) for m in model.modules()):
        return None
    smooth = sorted({type(m).__name__ for m in model.modules() if isinstance(m, SMOOTH_ACTIVATIONS)})
    name = _model_name(model)
    if smooth:
        return (
            f"guided backprop and deconvnet modify ReLU-like activations (ReLU, ReLU6), and {name} uses "
            f"{', '.join(smooth)}, which have no on/off mask to guide"
        )
    return (
        f"guided backprop and deconvnet modify ReLU and ReLU6 modules, and {name} has none (functional relu calls "
        "cannot be reached), so the result would be the plain gradient"
    )


class _ReLUCalls:
    """Counts ReLU function calls (from ``nn.ReLU`` modules and functional ones alike) inside
    ``with Intercept(counter.handlers()):``; changes nothing."""

    def __init__(self) -> None:
        self.count = 0

    def handlers(self):
        return {**dict.fromkeys(_RELU_FUNCTIONS, self._relu), **dict.fromkeys(_CLIP_FUNCTIONS, self._clip)}

    def _relu(self, func, args, kwargs):
        self.count += 1
        return func(*args, **kwargs)

    def _clip(self, func, args, kwargs):
        lower = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        self.count += float(lower) == 0.0
        return func(*args, **kwargs)


class ModifiedReLU(Method):
    """Input gradient with ``rule`` on every ReLU-like module (``rule_class``: a rule of ``rules.relu``)."""

    rule_class: Type[ReLURule]
    per_call = ("relu_rule",)

    def relu_rules(self):
        reason = activation_summary(self.model)
        if reason is not None:
            raise RuleError(f"{self.name}: {reason}; use a method without modified activations (e.g. gradient)")
        smooth = sorted({type(m).__name__ for m in self.model.modules() if isinstance(m, SMOOTH_ACTIVATIONS)})
        if smooth:
            warnings.warn(
                f"{self.name}: {_model_name(self.model)} also uses {', '.join(smooth)}, which have no guided rule: "
                "their backward stays plain",
                FunctionalReLUWarning,
                stacklevel=5,
            )
        self.relu_rule = self.rule_class()
        return [(relu_like_selector, self.relu_rule)]

    def rules(self, x):
        return self.relu_rules()

    def forward(self, x, classes, target):
        seen = _ReLUCalls()
        with Intercept(seen.handlers()):
            out = super().forward(x, classes, target)
        missed = seen.count - self.relu_rule.calls
        if missed > 0:
            warnings.warn(
                f"{self.name}: {missed} of {seen.count} ReLU calls in {_model_name(self.model)}'s forward are "
                "functional (F.relu / torch.relu / Tensor.relu) and keep their plain backward; only ReLU and "
                "ReLU6 modules get the modified rule",
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
