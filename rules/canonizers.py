r"""BatchNorm merging ("canonization") without touching the model.

An eval-mode BatchNorm right after a layer ``z = W x + b`` is an affine map per channel, so the pair is
one layer with ``W' = s·W``, ``b' = s·(b − μ) + β``, ``s = γ / sqrt(σ² + eps)``. Zennit merges by editing
the weights in place and restoring them afterwards; backprop_hooks never writes to a model, so here the merge
happens **inside the rules** and the model is never written to:

* the LRP rule on the layer (built with ``bn=merge``) offers its output tensor to ``merge``;
* ``merge`` (a :class:`MergeBatchNorm` rule on the BatchNorms) recognises, during the same forward pass,
  a BatchNorm whose input *is* that tensor, unchanged (same storage and version: no in-place op between),
  and links the two; its backward then passes the gradient through unchanged (``g_in = g_out``);
* in backward, the layer's rule redistributes the BatchNorm's output relevance with ``W', b'``.

A BatchNorm subclass that does more in its forward (timm's ``BatchNormAct2d``: the BatchNorm, then an
activation) is merged too: its backward hands down autograd's input gradient divided by the per-channel
scale ``s``, i.e. the gradient at the affine output, the activation's own gradient kept (as everywhere).

The pairing follows the actual data flow, not module order or names, so it works for torchvision's
Conv→BN pairs, ``nn.Sequential`` stacks and functional forwards alike. A BatchNorm in training mode (batch
statistics) or fed by anything else keeps its ordinary gradient: LRP-0 with its shift absorbing relevance.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from backprop_hooks.errors import RuleError
from backprop_hooks.rule import Rule

Tensor = torch.Tensor
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_affine(bn: nn.Module) -> Tuple[Tensor, Tensor]:
    """``(s, c)`` with ``bn(z) = s·z + c`` per channel, from the running statistics (eval mode)."""
    scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean.detach() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return scale, shift


def merged_params(weight: Tensor, bias: Optional[Tensor], bn: nn.Module) -> Tuple[Tensor, Tensor]:
    """The parameters of ``bn ∘ layer`` for a Linear/ConvNd layer: ``(s·W, s·b + c)``."""
    scale, shift = bn_affine(bn)
    scale, shift = scale.to(weight.dtype), shift.to(weight.dtype)
    merged_bias = shift if bias is None else scale * bias + shift
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), merged_bias


def mergeable(bn: nn.Module) -> bool:
    """True when ``bn`` uses running statistics (eval mode with ``track_running_stats``)."""
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


class Link:
    """Shared between a layer's call and the BatchNorm that consumes its output (``bn`` set then)."""

    __slots__ = ("bn", "__weakref__")

    def __init__(self) -> None:
        self.bn: Optional[nn.Module] = None


class _PassThrough(torch.autograd.Function):
    """A merged BatchNorm's output, whose backward hands the output gradient to the input unchanged
    (``g_in = g_out``): the BatchNorm's own backward, which the merge replaces, never runs."""

    @staticmethod
    def forward(ctx, x: Tensor, output: Tensor) -> Tensor:
        return output.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _key(t: Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t._version, t.dtype, t.device)


class MergeBatchNorm(Rule):
    """Rule for BatchNorm modules: merge each one into the LRP layer whose output it consumes.

    Pass the same instance as ``bn=`` to the layer rules; composites do. Linear: the pass-through
    ``g_in = g_out`` of a merged BatchNorm is linear, and so is the merged layer rule.
    """

    linear = True

    def __init__(self) -> None:
        self._offers: Dict[tuple, "weakref.ref[Link]"] = {}

    def check(self, module: nn.Module) -> None:
        if not isinstance(module, BN_TYPES):
            raise RuleError(
                f"MergeBatchNorm goes on nn.BatchNorm1d/2d/3d modules; it was put on a {type(module).__name__}"
            )

    def offer(self, output: Tensor) -> Link:
        """Called by a layer rule in forward: ``output`` may be consumed by a BatchNorm."""
        if len(self._offers) > 512:
            self._offers = {k: r for k, r in self._offers.items() if r() is not None}
        link = Link()
        self._offers[_key(output)] = weakref.ref(link)
        return link

    def forward(self, module, inputs, output):
        ref = self._offers.pop(_key(inputs[0]), None)
        link = ref() if ref is not None else None
        self.ctx.merged = link is not None and mergeable(module)
        if not self.ctx.merged:
            return None
        # the merged layer's rule recomputes this output from its own (``s·z + c``): no copy is kept
        link.bn = module
        if self._plain(module) and inputs[0].requires_grad:
            return _PassThrough.apply(inputs[0], output)
        return None

    @staticmethod
    def _plain(module: nn.Module) -> bool:
        return type(module).forward is nn.modules.batchnorm._BatchNorm.forward

    def backward(self, module, grad_input, grad_output):
        if not self.ctx.merged or grad_input[0] is None:
            return None
        if self._plain(module):  # the pass-through node handed g_out to the input already
            return None
        # more than the affine map in forward (an activation after it): the gradient at the affine output is
        # autograd's input gradient without the scale s (a channel with s = 0 carries nothing: 0)
        scale, _ = bn_affine(module)
        g = grad_input[0]
        inverse = torch.where(scale != 0, 1 / torch.where(scale != 0, scale, 1), 0).to(g.dtype)
        return (g * inverse.view(-1, *([1] * (g.dim() - 2))),) + tuple(grad_input[1:])


__all__ = ["MergeBatchNorm", "merged_params", "bn_affine", "mergeable", "BN_TYPES"]
