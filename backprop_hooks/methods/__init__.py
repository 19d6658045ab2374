"""Explanation methods: each a short composition of a target, rules and a read-out.

``available()`` lists the names usable in ``bh.explain(method=...)``.
"""

from .base import Method, available, create, get, grad, register
from .gradient import Gradient, InputXGradient, IntegratedGradients, SmoothGrad, path_rule
from .layers import default_layer, get_module, resolve_layer
from .cam import CAM, GradCAM, LayerGradient, LinearApprox, XGradCAM
from .fullgrad import FullGrad
from .guided import Deconvnet, GuidedBackprop, GuidedGradCAM, ModifiedReLU
from .lrp import LRP
from .attnlrp import AttnLRP
from .tokens import TokenLayout, token_layout
from .vit import GradRollout, Rollout, TransformerAttribution, ViTGradCAM

__all__ = [
    "Method",
    "available",
    "create",
    "get",
    "grad",
    "register",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "SmoothGrad",
    "path_rule",
    "default_layer",
    "get_module",
    "resolve_layer",
]
__all__ += ["CAM", "GradCAM", "XGradCAM", "LinearApprox", "LayerGradient", "FullGrad"]
__all__ += ["ModifiedReLU", "GuidedBackprop", "Deconvnet", "GuidedGradCAM"]
__all__ += ["LRP", "AttnLRP"]
__all__ += [
    "Rollout",
    "GradRollout",
    "TransformerAttribution",
    "ViTGradCAM",
    "TokenLayout",
    "token_layout",
]
