"""The library of backward rules and forward captures that methods are built from."""

from backprop_hooks.rule import Function, Identity, Rule

from .capture import Capture
from .fullgrad import BiasGradient
from .relu import DeconvReLU, GuidedReLU, ReLUPassThrough, ReLURule
from .lrp import AlphaBeta, Epsilon, Flat, Gamma, LRPRule, WSquare, ZBox, ZPlus
from .canonizers import MergeBatchNorm
from .attention import AttentionCapture, is_attention
from .vit_relevance import GELUHeld, LayerNormHeld, RMSNormHeld
from .products import ProductRules
from .composites import Composite, EpsilonAlpha2Beta1, EpsilonComposite, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat
from .attnlrp import CPLRP, AttnLRPComposite

__all__ = ["Rule", "Identity", "Function", "Capture"]
__all__ += ["BiasGradient", "ReLURule", "ReLUPassThrough", "GuidedReLU", "DeconvReLU"]
__all__ += ["LRPRule", "Epsilon", "ZPlus", "AlphaBeta", "Gamma", "Flat", "WSquare", "ZBox", "MergeBatchNorm"]
__all__ += ["Composite", "EpsilonComposite", "EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonGammaBox"]
__all__ += ["AttentionCapture", "is_attention", "LayerNormHeld", "GELUHeld", "RMSNormHeld"]
__all__ += ["ProductRules", "AttnLRPComposite", "CPLRP"]
