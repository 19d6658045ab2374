r"""The CAM family on any layer: Grad-CAM, XGrad-CAM and the linear approximation (LA), all contrastive.

With ``A`` the chosen layer's output ``(B, K, h, w)`` and ``G = ∂f/∂A`` (``f`` the target's objective,
i.e. the seed back-propagated from the logits **down to that layer only**):

* ``gradcam``:       ``Σ_k w_k A_k``,  ``w_k = mean_ij G_kij``  (Selvaraju et al. 2017)
* ``xgradcam``:      ``Σ_k w_k A_k``,  ``w_k = Σ_ij A_kij G_kij / (Σ_ij |A_kij| + 1e-7)`` (Fu et al. 2020,
  the review's variant without ReLU; ``|A|`` keeps the weights' sign meaningful on signed layers)
* ``linear_approx``: ``Σ_k A_k ⊙ G_k``  (the paper's "LA")

The layer is any module, by qualified name (``layer="layer4"``, ``"features.29"``); if it runs several
times in one forward pass, its last call is read. pytorch-grad-cam's XGradCAM divides by ``Σ_ij A_kij``
(no ``|·|``): the same on layers that follow a ReLU.

``relu=False`` (default) gives signed maps, linear in the seed, so every contrast identity holds;
``relu=True`` clamps the map at zero (the classic maps) and is not linear. ``attributions`` is the layer
grid ``(B, h, w)``; ``Explanation.maps`` upsamples it bilinearly to the input size.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from backprop_hooks.rules.capture import Capture

from ..checkpointing import gradients, reentrant_checkpoint_in, reentrant_error
from ..errors import InputError, LayerError
from ..explanation import upsample
from .base import Method, register
from .layers import resolve_layer


class LayerGradient:
    """Capture a layer's output and back-propagate a seed to it (a partial backward, never to the input).

    ``rules(x)`` resolves the layer (``None``: :func:`~backprop_hooks.methods.resolve_layer`'s
    default) and returns the capture to attach; ``read(logits, seed)`` returns ``(A, ∂f/∂A)``.
    """

    def __init__(self, model: nn.Module, layer: Optional[str] = None):
        self.model = model
        self.layer = layer
        self.name: Optional[str] = layer
        self.capture: Optional[Capture] = None

    def rules(self, x: torch.Tensor):
        self.name = resolve_layer(self.model, self.layer, x)
        self.capture = Capture()
        name = self.name
        return [(lambda n, m: n == name, self.capture)]

    def read(
        self, logits: torch.Tensor, seed: torch.Tensor, retain_graph: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.capture.outputs:
            if reentrant_checkpoint_in(logits):  # the layer ran without gradients, inside the checkpoint
                raise reentrant_error()
            raise LayerError(
                f"layer {self.name!r} did not run in the model's forward pass; choose a layer on the path to the logits"
            )
        a = self.capture.output
        if a.dim() < 3:
            raise InputError(
                f"layer {self.name!r} has output shape {tuple(a.shape)}; a CAM needs a spatial map (B, K, h, w): "
                "choose a convolutional layer or block"
            )
        if not a.requires_grad:
            raise InputError(f"the output of layer {self.name!r} does not depend on anything that requires grad")
        g = gradients(logits, a, seed, retain_graph=retain_graph)[0]
        return a.detach(), g

    def release(self) -> None:
        self.capture = None


def _spatial(a: torch.Tensor) -> Tuple[int, ...]:
    return tuple(range(2, a.dim()))


def weighted_sum(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Σ_k w_k A_k`` for per-sample channel weights ``w`` (B, K)."""
    return torch.einsum("bk...,bk->b...", a, w)


class CAM(Method):
    """A map ``cam(A, ∂f/∂A)`` of a layer's activation and gradient; ``relu=True`` clamps it at zero."""

    takes_layer = True
    space = "layer"

    def __init__(self, model: nn.Module, layer: Optional[str] = None, relu: bool = False, check_finite: bool = True):
        super().__init__(model, check_finite=check_finite)
        self.at = LayerGradient(model, layer)
        self.relu = relu
        self.linear = not relu

    @property
    def layer_name(self) -> Optional[str]:
        return self.at.name

    def rules(self, x):
        return self.at.rules(x)

    def release(self) -> None:
        self.at.release()

    def cam(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The signed map (B, h, w) from the activation ``a`` and its gradient ``g`` (both (B, K, h, w))."""
        raise NotImplementedError

    def layer_map(self, logits: torch.Tensor, seed: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        a, g = self.at.read(logits, seed, retain_graph)
        m = self.cam(a, g)
        return m.clamp(min=0) if self.relu else m

    def attribute(self, x, logits, seed):
        return self.layer_map(logits, seed)


@register
class GradCAM(CAM):
    """``Σ_k w_k A_k`` with ``w_k = mean_ij ∂f/∂A_kij``."""

    name = "gradcam"

    def cam(self, a, g):
        return weighted_sum(a, g.mean(_spatial(g)))


@register
class XGradCAM(CAM):
    """``Σ_k w_k A_k`` with ``w_k = Σ_ij A_kij ∂f/∂A_kij / (Σ_ij |A_kij| + 1e-7)``."""

    name = "xgradcam"
    eps = 1e-7

    def cam(self, a, g):
        dims = _spatial(a)
        return weighted_sum(a, (a * g).sum(dims) / (a.abs().sum(dims) + self.eps))


@register
class LinearApprox(CAM):
    """``Σ_k A_k ⊙ ∂f/∂A_k`` (the paper's "LA": the first-order term of the logit at the layer)."""

    name = "linear_approx"

    def cam(self, a, g):
        return (a * g).sum(1)


__all__ = ["LayerGradient", "CAM", "GradCAM", "XGradCAM", "LinearApprox", "weighted_sum", "upsample"]
