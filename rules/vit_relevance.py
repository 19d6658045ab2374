r"""Relevance rules for transformers: gradient × input with the non-linear gates held constant.

In gradient × input form the relevance of a tensor ``z`` is ``R_z = z ⊙ ∂̃f/∂z``, where ``∂̃`` is the
gradient with these rules (Ali et al., "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML 2022). Each treats one non-linear factor as a constant, which makes the propagation
conservative (``Σ R_in = Σ R_out`` up to biases) and keeps it linear in the seed:

* :class:`LayerNormHeld` (LN-rule): ``y = (x − μ)/σ · w + b`` with ``σ`` constant:
  ``∂̃y/∂x · g = (w ⊙ g − mean(w ⊙ g)) / σ``;
* :class:`RMSNormHeld`: ``y = w ⊙ x / rms(x)`` with ``rms(x) = sqrt(mean(x²) + ε)`` constant:
  ``∂̃y/∂x · g = w ⊙ g / rms(x)``;
* :class:`GELUHeld`: ``GELU(x) = x Φ(x)`` with the gate ``Φ(x)`` constant: ``∂̃ · g = Φ(x) ⊙ g``;
* the attention probabilities held constant (AH-rule): ``AttentionCapture(hold_attention=True)``.

Every rule has an ``enabled`` attribute, so a method can run a plain and a relevance backward pass over
one graph. The forward keeps only the held factor (``σ`` or ``1/rms`` per row, the gate), not the input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from backprop_hooks.rule import Rule
from backprop_hooks.errors import RuleError


class _Held(Rule):
    linear = True

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def forward(self, module, inputs, output):
        self.ctx.held = self.constant(module, inputs[0].detach())

    def constant(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The factor the backward pass holds, computed from the module's input ``x``."""
        raise NotImplementedError

    def held(self, module: nn.Module, constant: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, module, grad_input, grad_output):
        if not self.enabled or grad_input[0] is None or grad_output[0] is None:
            return None
        return (self.held(module, self.ctx.held, grad_output[0]),) + tuple(grad_input[1:])


class LayerNormHeld(_Held):
    """LN-rule: back-propagate through ``nn.LayerNorm`` with the standard deviation held constant."""

    def check(self, module):
        if not isinstance(module, nn.LayerNorm):
            raise RuleError(f"LayerNormHeld handles nn.LayerNorm, not {type(module).__name__}")

    def constant(self, module, x):
        dims = tuple(range(-len(module.normalized_shape), 0))
        return (x.var(dim=dims, unbiased=False, keepdim=True) + module.eps).sqrt()

    def held(self, module, std, g):
        dims = tuple(range(-len(module.normalized_shape), 0))
        wg = g * module.weight if module.weight is not None else g
        return (wg - wg.mean(dim=dims, keepdim=True)) / std


def is_rms_norm(module: nn.Module) -> bool:
    """``nn.RMSNorm``, or a module of another library named ``*RMSNorm`` computing ``weight · x / rms(x)`` with
    its ε in ``variance_epsilon`` or ``eps`` (Hugging Face's Llama, Mistral, Qwen; not Gemma's ``1 + weight``)."""
    if isinstance(module, nn.RMSNorm):
        return True
    name = type(module).__name__
    return (
        name.endswith("RMSNorm")
        and not name.startswith("Gemma")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", getattr(module, "eps", None)), float)
    )


class RMSNormHeld(_Held):
    """Back-propagate through an RMSNorm (see :func:`is_rms_norm`) with ``rms(x)`` held constant."""

    def check(self, module):
        if not is_rms_norm(module):
            raise RuleError(
                f"RMSNormHeld handles nn.RMSNorm and modules named *RMSNorm computing weight · x / rms(x), "
                f"not {type(module).__name__}"
            )

    def constant(self, module, x):
        if isinstance(module, nn.RMSNorm):
            dims, eps = tuple(range(-len(module.normalized_shape), 0)), module.eps
        else:
            dims, eps = (-1,), getattr(module, "variance_epsilon", getattr(module, "eps", None))
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        return torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)

    def held(self, module, inv_rms, g):
        g = g * inv_rms.to(g.dtype)
        return g * module.weight.to(g.dtype) if module.weight is not None else g


class GELUHeld(_Held):
    """Back-propagate through ``nn.GELU`` as ``x ↦ Φ(x)·x`` with the gate ``Φ(x)`` held constant."""

    def check(self, module):
        if not isinstance(module, nn.GELU):
            raise RuleError(f"GELUHeld handles nn.GELU, not {type(module).__name__}")

    def constant(self, module, x):
        if module.approximate == "tanh":
            return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return 0.5 * (1 + torch.erf(x / math.sqrt(2)))

    def held(self, module, gate, g):
        return gate * g
