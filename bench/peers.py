"""The same explanation computed by the libraries users would otherwise pick, and by the earlier code's
approach to contrast (C per-class backward passes). Each builder returns a zero-argument callable, or
None where the peer does not implement the method (or is not installed)."""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

import backprop_hooks as bh


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _captum(method: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module) -> Optional[Callable]:
    if not _installed("captum"):
        return None
    from captum import attr

    x = x.detach().requires_grad_(True)
    if method == "gradient":
        return lambda: attr.Saliency(model).attribute(x, target=t, abs=False)
    if method == "input_x_gradient":
        return lambda: attr.InputXGradient(model).attribute(x, target=t)
    if method == "integrated_gradients":
        return lambda: attr.IntegratedGradients(model).attribute(
            x, target=t, n_steps=16, internal_batch_size=x.shape[0] * 16
        )
    if method == "gradcam":
        return lambda: attr.LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=False)
    if method == "guided_backprop":
        return lambda: attr.GuidedBackprop(model).attribute(x, target=t)
    return None


def _pytorch_grad_cam(
    method: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module
) -> Optional[Callable]:
    if not _installed("pytorch_grad_cam"):
        return None
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": pgc.GradCAM, "xgradcam": pgc.XGradCAM, "fullgrad": pgc.FullGrad}.get(method)
    if cls is None:
        return None
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    layers = [] if method == "fullgrad" else [layer]  # FullGrad takes every bias layer; a layer given: it prints

    def run():
        with cls(model=model, target_layers=layers) as cam:
            return cam(input_tensor=x, targets=targets)

    return run


def _zennit(method: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module) -> Optional[Callable]:
    if method != "lrp" or not _installed("zennit"):
        return None
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    canonizers = _zennit_canonizers(model)

    def run():  # the same computation as ours: BatchNorms merged (Zennit edits the weights, then restores them)
        with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=canonizers)) as attributor:
            return attributor(x, lambda y: torch.nn.functional.one_hot(t, y.shape[1]).to(y.dtype))[1]

    return run


def _zennit_canonizers(model: nn.Module) -> list:
    """Zennit's BatchNorm merging for the benchmark models (torchvision ResNet / VGG; none without BatchNorm)."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return []
    import torchvision
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    return [ResNetCanonizer()] if isinstance(model, torchvision.models.ResNet) else [VGGCanonizer()]


def per_class(model: nn.Module, x: torch.Tensor, t: torch.Tensor, target: str, num_classes: int) -> Callable:
    """The earlier code's contrast: one forward, C backward passes, then the weighted composition."""

    def run():
        xg = x.detach().requires_grad_(True)
        y = model(xg)
        phis = []
        for s in range(num_classes):
            seed = torch.zeros_like(y)
            seed[:, s] = 1.0
            phis.append(torch.autograd.grad(y, xg, seed, retain_graph=True)[0])
        weights = bh.targets.get(target).seed(y.detach(), t)
        return torch.einsum("bs,sb...->b...", weights, torch.stack(phis))

    return run


def _lxt(method: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module) -> Optional[Callable]:
    """LXT's AttnLRP (its own patch map), on the model families it has a map for; patched and undone per call."""
    from . import lxt

    family = lxt.family_of(model) if method == "attnlrp" and lxt.installed() else None
    if family is None:
        return None

    with torch.no_grad():
        y = model(x)
    seed = torch.nn.functional.one_hot(t, y.shape[1]).to(y.dtype)

    def run():
        with lxt.patched(family):
            return lxt.relevance(model, x, seed)

    return run


BUILDERS = {"captum": _captum, "pytorch-grad-cam": _pytorch_grad_cam, "zennit": _zennit, "lxt": _lxt}


def peers(
    method: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module, skip: Sequence[str] = ()
) -> Dict[str, Callable]:
    """Peer name -> callable computing ``method`` for the logit of classes ``t`` on the same model and input.
    ``skip``: ``"method:peer"`` pairs left out (e.g. ``"fullgrad:pytorch-grad-cam"``, minutes per call on a CPU)."""
    found = {
        name: build(method, model, x, t, layer) for name, build in BUILDERS.items() if f"{method}:{name}" not in skip
    }
    return {name: fn for name, fn in found.items() if fn is not None}
