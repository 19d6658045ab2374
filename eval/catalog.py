"""`backprop-hooks models [MODEL]`: the architectures, and for one of them its classes, layers and methods.

Without MODEL: one line per architecture (kind, number of classes, input size, default layer, default
``explain`` method). With MODEL: the classes (index and name), the layers a layer method can take (modules
with a spatial (C, h, w) output on convolutional networks, the blocks' token inputs on transformers), and
every method with whether it fits the model and, if not, why. ``--weights`` reads a checkpoint (its class
names from the ``class_names.json`` beside it, as ``finetune`` writes it).

The catalogue the other commands use too: which methods fit a model (:func:`unfit_reason`), the default
method, and the options a method takes.
"""

from __future__ import annotations

import argparse
from typing import List, Optional, Tuple

import torch
from torch import nn

import backprop_hooks as bh


DEFAULT_METHOD = "gradcam"  # explain's method on convolutional networks (grad_rollout on transformers)
GUIDED = ("guided_backprop", "deconvnet", "guided_gradcam")
# methods whose maps do not depend on the class (the figure says so)
CLASS_INDEPENDENT = ("rollout",)


def is_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a vision transformer (it holds attention modules)."""
    from backprop_hooks.rules.attention import is_attention

    return any(is_attention(name, module) for name, module in model.named_modules())


def unfit_reason(method: str, model: nn.Module) -> Optional[str]:
    """Why ``method`` cannot explain ``model`` (in command-line words), or None when it can."""
    cls = bh.methods.get(method)
    vit = is_transformer(model)
    kind = "a vision transformer" if vit else "a convolutional network"
    if cls.space == "tokens" and not vit:
        return f"{method} reads attention and token grids, and {getattr(model, 'arch', 'this model')} is {kind}"
    if vit and (cls.space == "layer" or method == "guided_gradcam"):
        return (
            f"{method} needs a convolutional feature map (C, h, w), and {getattr(model, 'arch', 'this model')} is "
            f"{kind} (tokens); its counterpart on tokens is vit_gradcam"
        )
    if method in GUIDED:
        from backprop_hooks.methods.guided import activation_summary

        reason = activation_summary(model)
        if reason is not None:
            return reason
    return None


def applicable_methods(model: nn.Module) -> List[str]:
    """The methods that fit ``model`` (see :func:`unfit_reason`)."""
    return [m for m in bh.methods.available() if unfit_reason(m, model) is None]


def default_method(model: nn.Module) -> str:
    """The method ``explain`` uses when none is given: Grad-CAM on CNNs, gradient-weighted rollout on ViTs."""
    return "grad_rollout" if is_transformer(model) else DEFAULT_METHOD


def method_option_names(method: str) -> List[str]:
    """The options ``--option NAME=VALUE`` accepts for ``method`` (its constructor's keywords)."""
    return [n for n in bh.methods.get(method).options() if n not in ("layer", "check_finite")]


def spatial_layers(model: nn.Module) -> List[Tuple[str, Tuple[int, ...]]]:
    """Modules whose output is a (B, C, h, w) grid (CNN layers) or (B, L, D) tokens (ViT blocks), with the
    output shape of one input at the model's size: the values ``--layer`` accepts."""
    size = tuple(getattr(model, "input_size", (224, 224)))
    found: List[Tuple[str, Tuple[int, ...]]] = []
    hooks = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (nn.Identity, nn.Dropout)):
            continue

        def hook(module, inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.dim() in (3, 4):
                found.append((name, tuple(output.shape[1:])))

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size, device=next(model.parameters()).device))
    finally:
        for handle in hooks:
            handle.remove()
    return list(dict.fromkeys(found))


def describe(model: nn.Module, name: str, classes: bool = True, layers: bool = True) -> str:
    """The text ``backprop-hooks models NAME`` prints."""
    kind = "vision transformer" if is_transformer(model) else "convolutional network"
    lines = [
        f"{name}: {kind}, {len(model.class_names)} classes, input {tuple(model.input_size)}, "
        f"default layer {model.default_layer}, default method {default_method(model)}",
        "",
        "methods (backprop-hooks explain --method M):",
    ]
    for method in bh.methods.available():
        reason = unfit_reason(method, model)
        space = bh.methods.get(method).space
        lines.append(
            f"  {'yes' if reason is None else 'no ':<4} {method:<24} {space:<7}" + (f" {reason}" if reason else "")
        )
    if layers:
        lines += ["", "layers (--layer NAME, output shape per image):"]
        lines += [f"  {layer}  {tuple(shape)}" for layer, shape in spatial_layers(model)]
    if classes:
        lines += ["", "classes (--classes C or versus:C, by index or name):"]
        lines += [f"  {i:>5}  {n}" for i, n in enumerate(model.class_names)]
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``models`` subcommand; its ``func`` default is :func:`run`."""
    parser = subparsers.add_parser(
        "models",
        help="list the architectures, or one model's classes, layers and the methods that fit it",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL", help="an architecture name")
    parser.add_argument("--weights", default=None, help="a local checkpoint (its class_names.json names the classes)")
    parser.add_argument("--no-classes", dest="classes", action="store_false", help="do not list the classes")
    parser.add_argument("--no-layers", dest="layers", action="store_false", help="do not list the layers")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """``backprop-hooks models [MODEL]``: the architectures, or one model's classes, layers and methods."""
    from backprop_hooks import models
    from backprop_hooks.models import zoo

    if args.model is None:
        print(f"{'model':<24} {'kind':<12} {'classes':>7}  default layer")
        for name in models.available():
            spec = zoo.spec(name)
            kind = "transformer" if "vit" in name or "deit" in name else "CNN"
            print(f"{name:<24} {kind:<12} {spec.num_classes:>7}  model.{spec.default_layer}")
        print("\ndetails (classes, layers, methods that fit): backprop-hooks models MODEL")
        return 0
    model = models.create(args.model, pretrained=False, weights=args.weights)
    if args.weights is None:  # random weights: the architecture's own class names
        spec = zoo.spec(args.model)
        model.class_names = spec.class_names()
    print(describe(model, args.model, classes=args.classes, layers=args.layers))
    return 0
