"""Typed errors raised while building models and loading their weights."""
from __future__ import annotations


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (offline, missing package, failed download)."""


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the architecture it is loaded into."""


class UnknownArchitectureError(ValueError):
    """An architecture name that `models.available()` does not list."""
