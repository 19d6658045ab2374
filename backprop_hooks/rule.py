"""The base class of backward rules.

A rule is attached to modules with :func:`backprop_hooks.attach`. For every call of such a module the
framework calls ``rule.before(module, inputs)`` before the module runs (optional),
``rule.forward(module, inputs, output)`` after it ran, and, during the backward pass,
``rule.backward(module, grad_input, grad_output)`` with tuples shaped like PyTorch's module hooks:
``grad_input[i]`` is the gradient for the i-th positional input (``None`` for non-tensors and tensors
that do not require grad), ``grad_output[j]`` the gradient for the j-th tensor of the output.

Per-call state: anything a rule stores on ``self.ctx`` in ``forward`` is given back on ``self.ctx`` in the
matching ``backward``, also when one rule instance sits on many modules or a module runs several times in
one forward pass.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

Grads = Tuple[Optional[torch.Tensor], ...]


class Rule:
    """A backward rule. Override ``forward`` and/or ``backward``; both are optional.

    ``linear``: whether ``backward`` is linear in the incoming gradient (then the contrast identities of
    :mod:`backprop_hooks.targets` hold for methods built from it).
    """

    linear: bool = True
    needs_backward: bool = True  # False: never reads or changes gradients; the module then gets no gradient gates
    ctx: SimpleNamespace

    def check(self, module: nn.Module) -> None:
        """Raise :class:`~backprop_hooks.errors.RuleError` if this rule cannot handle ``module``."""

    def parts(self, module: nn.Module) -> Sequence[Tuple[nn.Module, "Rule"]]:
        """Helper rules this rule needs on submodules of ``module``, as ``(submodule, rule)`` pairs. They are
        attached and removed with it, on hooks of their own placed after all others, so they see each
        submodule's final output."""
        return ()

    def before(self, module: nn.Module, inputs: Tuple[Any, ...]) -> None:
        """Optional: called before ``module`` runs (when gradients are enabled), with the call's ``self.ctx``."""

    def forward(self, module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> Any:
        """Called after ``module`` ran. Return ``None``, or a replacement for ``output``."""
        return None

    def backward(self, module: nn.Module, grad_input: Grads, grad_output: Grads) -> Optional[Grads]:
        """Return a new ``grad_input`` tuple (same length), or ``None`` to keep it."""
        return None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "ctx" and not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Identity(Rule):
    """Keeps every gradient as it is (useful to test the plumbing: results equal plain autograd)."""


class Function(Rule):
    """A rule from a function ``fn(module, grad_input, grad_output) -> grad_input | None``."""

    def __init__(self, fn, linear: bool = True):
        self.fn = fn
        self.linear = linear

    def backward(self, module, grad_input, grad_output):
        return self.fn(module, grad_input, grad_output)
