r"""Relevance rules for transformers: gradient × input with the non-linear gates held constant.

In gradient × input form the relevance of a tensor ``z`` is ``R_z = z ⊙ ∂̃f/∂z``, where ``∂̃`` is the
gradient with these rules (Ali et al., "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML 2022). Each treats one non-linear factor as a constant, which makes the propagation
conservative (``Σ R_in = Σ R_out`` up to biases) and keeps it linear in the seed:

* :class:`LayerNormHeld` (LN-rule): ``y = (x − μ)/σ · w + b`` with ``σ`` constant:
  ``∂̃y/∂x · g = (w ⊙ g − mean(w ⊙ g)) / σ``;
* :class:`RMSNormHeld`: ``y = w ⊙ x / rms(x)`` with ``rms(x) = sqrt(mean(x²) + ε)`` constant:
  ``∂̃y/∂x · g = w ⊙ g / rms(x)`` (``1 + w`` for the norms that scale by it, e.g. Gemma's);
* :class:`GELUHeld`: ``GELU(x) = x Φ(x)`` with the gate ``Φ(x)`` constant: ``∂̃ · g = Φ(x) ⊙ g``, the gate
  read off the module's own forward as ``out / x`` (its limit ``1/2`` at ``x = 0``);
* the attention probabilities held constant (AH-rule): ``AttentionCapture(hold_attention=True)``.

Every rule has an ``enabled`` attribute, so a method can run a plain and a relevance backward pass over one
graph. The module's output reaches the rest of the model through one autograd node per call, and no gradient
hooks are involved:

* a rule **on** when the module runs cuts the module's own graph (freed at once; its backward never runs):
  the node keeps only the held factor (``σ`` or ``1/rms`` per row, the gate) and hands the held gradient to
  the module's input;
* a rule **off** when the module runs keeps the module's graph: switched off in the backward pass the
  gradient enters it unchanged (autograd's own backward), switched on the node hands the held gradient to
  the input (computed then from the module's input and output) and the module's backward gets no gradient:
  it computes nothing.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from backprop_hooks.checkpointing import outside_checkpoint
from backprop_hooks.errors import RuleError
from backprop_hooks.module_weights import module_tensor
from backprop_hooks.rule import Rule


class _HeldCut(torch.autograd.Function):
    """The module's output (detached: its graph is gone) with the backward ``rule.held(constant)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, rule: "_Held", module: nn.Module, constant) -> torch.Tensor:
        ctx.rule, ctx.module, ctx.constant = rule, module, constant
        return out.detach()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.rule.held(ctx.module, ctx.constant, g), None, None, None, None


class _HeldPath(torch.autograd.Function):
    """The module's output unchanged; backward: ``rule.enabled`` → the held gradient to the input and nothing
    into the module's graph, else the gradient into the module's graph as it is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, rule: "_Held", module: nn.Module) -> torch.Tensor:
        ctx.save_for_backward(x, out)
        ctx.rule, ctx.module = rule, module
        return out.detach()  # shares out's memory

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if not ctx.rule.enabled:
            return None, g, None, None
        x, out = ctx.saved_tensors
        constant = ctx.rule.constant(ctx.module, x.detach(), out.detach())
        return ctx.rule.held(ctx.module, constant, g), None, None, None


class _Held(Rule):
    """Base of the held rules: ``constant(module, x, out)`` is the factor held, ``held(module, constant, g)``
    the input gradient for the output gradient ``g`` (see the module docstring for when each runs)."""

    linear = True
    needs_backward = False  # the held gradient lives in the graph (_HeldCut, _HeldPath): no gradient hooks

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def forward(self, module, inputs, output):
        x = inputs[0] if inputs else None
        if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.requires_grad):
            return None
        if not torch.is_grad_enabled():
            return None
        if self.enabled:
            constant = self.constant(module, x.detach(), output.detach())
            return _HeldCut.apply(x, output.detach(), self, module, constant)
        with outside_checkpoint():  # a checkpoint's recomputation runs no rule: it must not expect these
            return _HeldPath.apply(x, output, self, module)

    def constant(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The factor the backward pass holds, from the module's input ``x`` and output ``out``."""
        raise NotImplementedError

    def held(self, module: nn.Module, constant: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The held gradient at the module's input for the output gradient ``g``."""
        raise NotImplementedError


class LayerNormHeld(_Held):
    """LN-rule: back-propagate through ``nn.LayerNorm`` with the standard deviation held constant."""

    def check(self, module):
        if not isinstance(module, nn.LayerNorm):
            raise RuleError(f"LayerNormHeld handles nn.LayerNorm, not {type(module).__name__}")

    def constant(self, module, x, out):
        """``1/σ`` per row, as the LayerNorm itself computes it (one ``native_layer_norm``)."""
        return torch.native_layer_norm(x, module.normalized_shape, None, None, module.eps)[2]

    def held(self, module, rstd, g):
        dims = tuple(range(-len(module.normalized_shape), 0))
        weight = module_tensor(module)  # read here: offloaded weights are loaded for the forward call only
        wg = g * weight.to(g.device) if weight is not None else g
        return (wg - wg.mean(dim=dims, keepdim=True)).mul_(rstd.to(wg.dtype))


def is_rms_norm(module: nn.Module) -> bool:
    """``nn.RMSNorm``, or a module of another library named ``*RMSNorm`` computing ``w · x / rms(x)`` with its ε
    in ``variance_epsilon`` or ``eps`` (Hugging Face's Llama, Mistral, Qwen), or ``(1 + w) · x / rms(x)``
    (Gemma's, Qwen3-Next's: see :func:`rms_norm_offset`)."""
    if isinstance(module, nn.RMSNorm):
        return True
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", getattr(module, "eps", None)), float)
    )


def rms_norm_offset(module: nn.Module) -> float:
    """1 for an RMSNorm that scales by ``1 + weight`` (its weight starts at zero: Gemma's, Qwen3-Next's), else 0;
    read from its class's ``forward`` once per class."""
    return 0.0 if isinstance(module, nn.RMSNorm) else _offset_of(type(module))


@functools.lru_cache(maxsize=None)
def _offset_of(cls: type) -> float:
    try:
        source = "".join(inspect.getsource(cls.forward).split())
    except (OSError, TypeError):
        return 0.0
    return 1.0 if ("(1.0+self.weight" in source or "(1+self.weight" in source) else 0.0


class RMSNormHeld(_Held):
    """Back-propagate through an RMSNorm (see ``is_rms_norm``) with ``rms(x)`` held constant."""

    def check(self, module):
        if not is_rms_norm(module):
            raise RuleError(
                f"RMSNormHeld handles nn.RMSNorm and modules named *RMSNorm computing weight · x / rms(x), "
                f"not {type(module).__name__}"
            )

    def constant(self, module, x, out):
        if isinstance(module, nn.RMSNorm):
            dims, eps = tuple(range(-len(module.normalized_shape), 0)), module.eps
        else:
            dims, eps = (-1,), getattr(module, "variance_epsilon", getattr(module, "eps", None))
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        return torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)

    def held(self, module, inv_rms, g):
        g = g * inv_rms.to(g.dtype)
        weight = module_tensor(module)
        if weight is None:
            return g
        return g * (weight.to(device=g.device, dtype=g.dtype) + rms_norm_offset(module))


def held_gate(x: torch.Tensor, out: torch.Tensor, at_zero: float = 0.5) -> torch.Tensor:
    """The gate ``out / x`` of an activation ``x ↦ gate(x)·x``, ``at_zero`` where it is ``0/0`` (``x = 0``;
    1/2 is every GELU's and SiLU's limit). One division and one pass over it: no mask is built."""
    return (out / x).nan_to_num_(nan=at_zero)


class GELUHeld(_Held):
    """Back-propagate through ``nn.GELU`` as ``x ↦ Φ(x)·x`` with the gate ``Φ(x) = out/x`` held constant."""

    at_zero: float = 0.5

    def check(self, module):
        if not isinstance(module, nn.GELU):
            raise RuleError(f"GELUHeld handles nn.GELU, not {type(module).__name__}")

    def constant(self, module, x, out):
        return held_gate(x, out, self.at_zero)

    def held(self, module, gate, g):
        return gate * g


__all__ = ["LayerNormHeld", "RMSNormHeld", "GELUHeld", "held_gate", "is_rms_norm", "rms_norm_offset"]
