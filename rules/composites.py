r"""LRP composites: which rule goes on which layer, as a rule spec for :func:`backprop_hooks.attach`.

``composite.spec(model)`` returns a list of ``(selector, rule)`` pairs built from the model's structure:

* the **first layer** is the first ``nn.Linear``/``nn.Conv1d/2d/3d`` in *module order*
  (``model.named_modules()``, the order Zennit uses too); it gets the composite's first-layer rule with
  ``input_layer=True``, so the gradient at the model's input is the relevance. Exact when that layer is
  the only consumer of the input; elementwise ops before it (a normalisation ``(x − μ)/σ`` in the
  forward) apply their ordinary gradient to the relevance (a per-channel factor ``1/σ``);
* other convolutions get ``conv``, other Linear layers ``dense``;
* with ``canonize=True`` every BatchNorm gets one :class:`~backprop_hooks.rules.canonizers.MergeBatchNorm` shared by all
  layer rules, merging it into the layer whose output it consumes (see :mod:`backprop_hooks.rules.canonizers`).

Activations, pooling and additions keep their gradient (see :mod:`backprop_hooks.rules.lrp` for what that means).
Each ``spec`` call makes fresh rule instances, so concurrent explanations never share state.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Type, Union

import torch
from torch import nn

from backprop_hooks.errors import OptionError, RuleError, UnknownNameError, choices
from backprop_hooks.options import check_options, constructor_options
from backprop_hooks.rule import Rule

from .canonizers import BN_TYPES, MergeBatchNorm
from .layers import CONV_TYPES, LAYER_TYPES
from .lrp import AlphaBeta, Epsilon, Flat, Gamma, LRPRule, ZBox, ZPlus

Spec = List[Tuple[Callable[[str, nn.Module], bool], Rule]]


def _members(modules: List[nn.Module]) -> Callable[[str, nn.Module], bool]:
    ids = frozenset(id(m) for m in modules)
    return lambda name, module: id(module) in ids


def first_layer(model: nn.Module) -> Tuple[str, nn.Module]:
    """The first Linear/ConvNd of ``model`` in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            return name, module
    raise RuleError(f"{type(model).__name__} has no nn.Linear or nn.Conv1d/2d/3d layer for LRP rules")


class Composite:
    """Base composite: subclasses override ``first``, ``conv`` and ``dense`` (rule factories)."""

    name = "composite"
    kind = "LRP composite"  # what error messages call this family

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, canonize: bool = True):
        self.epsilon, self.stabilizer, self.canonize = epsilon, stabilizer, canonize

    def first(self, bn: Optional[MergeBatchNorm]) -> LRPRule:
        return self.conv(bn, input_layer=True)

    def conv(self, bn: Optional[MergeBatchNorm], input_layer: bool = False) -> LRPRule:
        return Epsilon(self.epsilon, input_layer=input_layer, bn=bn)

    def dense(self, bn: Optional[MergeBatchNorm], input_layer: bool = False) -> LRPRule:
        return Epsilon(self.epsilon, input_layer=input_layer, bn=bn)

    def spec(self, model: nn.Module) -> Spec:
        first_name, first = first_layer(model)
        convs, denses, norms = [], [], []
        for _, module in model.named_modules():
            if module is first:
                continue
            if isinstance(module, CONV_TYPES):
                convs.append(module)
            elif isinstance(module, nn.Linear):
                denses.append(module)
            elif isinstance(module, BN_TYPES):
                norms.append(module)
        bn = MergeBatchNorm() if self.canonize and norms else None
        first_rule = self.first(bn) if isinstance(first, CONV_TYPES) else self.dense(bn, input_layer=True)
        spec: Spec = [(_members([first]), first_rule)]
        if convs:
            spec.append((_members(convs), self.conv(bn)))
        if denses:
            spec.append((_members(denses), self.dense(bn)))
        if bn is not None:
            spec.append((_members(norms), bn))
        return spec

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class EpsilonComposite(Composite):
    """LRP-ε on every layer."""

    name = "epsilon"


class EpsilonPlus(Composite):
    """z⁺ on convolutions (the first one included), ε on Linear layers."""

    name = "epsilon_plus"

    def conv(self, bn, input_layer=False):
        return ZPlus(self.stabilizer, input_layer=input_layer, bn=bn)


class EpsilonPlusFlat(EpsilonPlus):
    """Flat on the first layer, z⁺ on other convolutions, ε on Linear layers."""

    name = "epsilon_plus_flat"

    def first(self, bn):
        return Flat(self.stabilizer, bn=bn)

    def dense(self, bn, input_layer=False):
        return Flat(self.stabilizer, bn=bn) if input_layer else super().dense(bn)


class EpsilonAlpha2Beta1(Composite):
    """α2β1 on convolutions (the first one included), ε on Linear layers."""

    name = "epsilon_alpha2_beta1"

    def conv(self, bn, input_layer=False):
        return AlphaBeta(2.0, 1.0, self.stabilizer, input_layer=input_layer, bn=bn)


class EpsilonGammaBox(Composite):
    """z^B with pixel bounds ``[low, high]`` on the first layer, γ on other convolutions, ε on Linear.

    ``low``/``high`` are bounds of the first layer's *input* (after any normalisation in the forward):
    floats or tensors broadcastable to it, e.g. shaped (1, C, 1, 1).
    """

    name = "epsilon_gamma_box"

    def __init__(self, low: Union[float, torch.Tensor], high: Union[float, torch.Tensor], gamma: float = 0.25, **kw):
        super().__init__(**kw)
        self.low, self.high, self.gamma = low, high, gamma

    def first(self, bn):
        return ZBox(self.low, self.high, self.stabilizer, bn=bn)

    def conv(self, bn, input_layer=False):
        return Gamma(self.gamma, self.stabilizer, input_layer=input_layer, bn=bn)

    def dense(self, bn, input_layer=False):
        return self.first(bn) if input_layer else super().dense(bn)


COMPOSITES: Dict[str, Type[Composite]] = {
    c.name: c for c in (EpsilonComposite, EpsilonPlus, EpsilonPlusFlat, EpsilonAlpha2Beta1, EpsilonGammaBox)
}


def get_composite(
    composite: Union[str, Composite], registry: Optional[Dict[str, type]] = None, base: type = Composite, **options
):
    """A composite from its name (``"epsilon_plus_flat"``) and options, or a ``base`` instance as is.
    ``registry``/``base``: another family of composites (default: the LRP composites of this module)."""
    registry = COMPOSITES if registry is None else registry
    kind = getattr(base, "kind", base.__name__)
    if isinstance(composite, base):
        if options:
            raise OptionError(
                f"options {sorted(options)} given together with a {base.__name__} instance; set them on the instance"
            )
        return composite
    if isinstance(composite, str) and composite in registry:
        check_options(options, constructor_options(registry[composite], ("self",)), f"{kind} {composite!r}")
        return registry[composite](**options)
    raise UnknownNameError(
        f"unknown {kind} {composite!r}; accepted: {choices(list(registry))} or a {base.__name__} instance"
    )


__all__ = [
    "Composite",
    "EpsilonComposite",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "EpsilonAlpha2Beta1",
    "EpsilonGammaBox",
    "COMPOSITES",
    "get_composite",
    "first_layer",
]
