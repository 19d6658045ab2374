"""The library of backward rules and forward captures that methods are built from."""
from backprop_hooks.rule import Function, Identity, Rule

from .capture import Capture

__all__ = ["Rule", "Identity", "Function", "Capture"]
