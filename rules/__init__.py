"""The library of backward rules and forward captures that methods are built from."""
from backprop_hooks.rule import Function, Identity, Rule

from .capture import Capture
from .fullgrad import BiasGradient
from .relu import DeconvReLU, GuidedReLU, ReLUPassThrough

__all__ = ["Rule", "Identity", "Function", "Capture"]
__all__ += ["BiasGradient", "ReLUPassThrough", "GuidedReLU", "DeconvReLU"]
