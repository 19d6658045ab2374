"""Typed errors. Each message says what was wrong and what would be right.

All errors derive from :class:`BackpropHooksError`, and each also derives from the built-in exception a
user would expect (``ValueError``, ``TypeError``, ``KeyError``-like lookups are ``ValueError``), so
``except ValueError`` keeps working.
"""
from __future__ import annotations

from typing import Iterable


class BackpropHooksError(Exception):
    """Base class of every error raised by backprop_hooks."""


class InputError(BackpropHooksError, ValueError):
    """The input tensor is unusable: wrong type, dtype, rank, or non-finite values."""


class ClassIndexError(BackpropHooksError, ValueError):
    """Class indices out of range, of the wrong dtype, or of the wrong shape."""


class ModelOutputError(BackpropHooksError, ValueError):
    """The model's output is not a (B, C) tensor of logits matching the input's batch."""


class UnknownNameError(BackpropHooksError, ValueError):
    """A method, target, layer or rule name that does not exist."""


class SelectorError(BackpropHooksError, ValueError):
    """A module selector of ``attach`` that is malformed or matches no module."""


class RuleError(BackpropHooksError, RuntimeError):
    """A rule misbehaved (wrong return value) or was put on a module it cannot handle."""


def choices(values: Iterable[object], limit: int = 12) -> str:
    """Format accepted values for an error message: ``'a', 'b', ... (N in all)``."""
    values = [repr(v) if isinstance(v, str) else str(v) for v in values]
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")
