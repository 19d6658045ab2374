r"""FullGrad (Srinivas & Fleuret 2019), contrastive: input-gradient and bias-gradients from ONE backward.

With ``f`` the target's objective, ``g_l = ∂f/∂y_l`` at the output of every biased module ``l`` (bias ``b_l``,
see :mod:`backprop_hooks.rules.fullgrad`) and ``x ⊙ ∂f/∂x`` at the input, FullGrad's map is

    ``Σ_l up(post(b_l ⊙ g_l)) + post(x ⊙ ∂f/∂x)``

(``up``: bilinear upsampling to the input size, ``align_corners=False``; ``post`` reduces ``(B, C, *s)`` to
``(B, *s)``). Only spatial parts enter the map. ``post``:

* ``"abs"`` (the original): ``|·|``, min-max normalised to [0, 1] per sample over all channels and positions
  (``+ eps``, default ``1e-6`` as the original code), then summed over channels. Not linear in the seed.
* ``"signed"`` (the review's readable contrastive variant): channel sum, divided per sample by its max
  ``|·|`` (``+ eps``): sign-preserving, but the per-sample scale depends on the seed, so not linear either.
* ``None``: the raw channel sums, linear in the seed (the contrast identities hold).
* a callable ``(B, C, *s) -> (B, *s)``: applied to every part; treated as not linear.

Raw parts (``Explanation.extras``): ``"input"`` = ``x ⊙ ∂f/∂x`` ``(B, Cin, H, W)``, ``"bias"`` = ``{layer:
Σ_c b_c g_c}`` (spatial ``(B, h, w)``; non-spatial layers such as the classifier head ``(B,)``), ``"total"`` =
the sum of all of them ``(B,)``. Completeness: for a network of ReLUs, convolutions, linear layers and
pooling (piecewise linear, no BatchNorm in training mode) ``total = f(x) = seed · logits``.

Differences from pytorch-grad-cam's ``FullGrad`` (same raw parts, checked in ``tests/test_fullgrad.py``):
it normalises every channel of every part separately (not the whole part), resizes with OpenCV, adds a
final min-max normalisation, uses ``eps = 1e-7``, counts only ``Conv2d``/``BatchNorm2d`` (exact types,
paired with gradients by registration order, so a module run twice or out of order breaks it), and only
explains logits. The original code (idiap/fullgrad-saliency) upsamples with ``align_corners=True``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Union

import torch
from torch import nn

from backprop_hooks.rules.fullgrad import BiasGradient, has_bias

from ..errors import InputError, OptionError
from .base import Method, grad, register
from .cam import upsample

Post = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]
EPS = 1e-6


def abs_minmax(part: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``|part|`` min-max normalised per sample over channels and positions, then summed over channels:
    ``Σ_c (|p_c| − lo) / (hi − lo + eps) = (Σ_c |p_c| − C·lo) / (hi − lo + eps)`` (no normalised copy)."""
    m = part.abs()
    lo, hi = torch.aminmax(m.flatten(1), dim=1)
    shape = (-1,) + (1,) * (m.dim() - 2)
    return (m.sum(1) - m.shape[1] * lo.view(shape)) / (hi - lo + eps).view(shape)


def signed_maxabs(part: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The channel sum divided per sample by its max ``|·|``: in [-1, 1], sign kept."""
    s = part.sum(1)
    return s / (s.flatten(1).abs().amax(1).view(-1, *([1] * (s.dim() - 1))) + eps)


POSTS = {"abs": abs_minmax, "signed": signed_maxabs}


@register
class FullGrad(Method):
    """``post(x ⊙ ∂f/∂x) + Σ_l up(post(b_l ⊙ ∂f/∂y_l))`` from one backward pass; see the module docstring."""

    name = "fullgrad"
    per_call = ("names", "bias")

    def __init__(self, model: nn.Module, post: Post = "abs", eps: float = EPS, check_finite: bool = True):
        super().__init__(model, check_finite=check_finite)
        if isinstance(post, str) and post not in POSTS:
            raise OptionError(
                f"unknown FullGrad post-processing {post!r}; accepted: 'abs', 'signed', None or a callable"
            )
        self.post, self.eps = post, eps
        self.reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = (
            partial(POSTS[post], eps=eps) if isinstance(post, str) else post
        )
        self.linear = post is None

    def rules(self, x):
        self.names = {m: n for n, m in self.model.named_modules() if has_bias(m)}
        if not self.names:
            raise InputError(
                f"FullGrad needs modules with a bias (conv, linear, BatchNorm); {type(self.model).__name__} has none"
            )
        self.bias = BiasGradient(self.reduce)
        names = self.names
        return [(lambda n, m: m in names, self.bias)]

    def attribute(self, x, logits, seed):
        if x.dim() < 3:
            raise InputError(f"FullGrad needs a spatial input (B, C, H, W); got shape {tuple(x.shape)}")
        input_part = x.detach() * grad(logits, x, seed)
        parts = self.bias.by_name(self.names)
        size = tuple(x.shape[2:])
        total_map = input_part.sum(1) if self.reduce is None else self.reduce(input_part)
        for _, raw, reduced in parts:
            if reduced is not None and reduced.dim() == x.dim() - 1:
                total_map = total_map + upsample(reduced, size)
        raw_parts = {name: raw.detach() for name, raw, _ in parts}
        total = input_part.flatten(1).sum(1) + sum(r.reshape(r.shape[0], -1).sum(1) for r in raw_parts.values())
        return total_map, {"input": input_part.detach(), "bias": raw_parts, "total": total.detach()}


__all__ = ["FullGrad", "abs_minmax", "signed_maxabs"]
