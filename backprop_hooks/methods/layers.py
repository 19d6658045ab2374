"""Choosing a layer by its qualified name, and the default layer of a model."""

from __future__ import annotations

import difflib
import weakref
from typing import Optional

import torch
from torch import nn

from ..errors import UnknownNameError, choices
from ..runtime import clean_name, eager_call, forward_errors, named_modules, unwrap

_DEFAULTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (``""`` is the model itself); a clear error with close matches. Names are
    those of the original model, also for a ``torch.compile``d one (no ``_orig_mod``)."""
    if not isinstance(name, str):
        raise UnknownNameError(f"a layer is named by a string (e.g. 'layer4'), got {type(name).__name__}")
    modules = dict(named_modules(model))
    name = clean_name(name)
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
    hint = f"close matches: {choices(close)}" if close else f"names look like {choices([n for n in modules if n][:10])}"
    raise UnknownNameError(f"layer {name!r} is not a module of {type(unwrap(model)).__name__}; {hint}")


def default_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The model's recorded ``default_layer`` attribute, else the last module (in execution order) whose
    output is a spatial map ``(B, C, h, w)`` with ``h·w > 1``, found by one no-grad pass on ``x[:1]``
    (cached per model and input size)."""
    model = unwrap(model)
    recorded = getattr(model, "default_layer", None)
    if isinstance(recorded, str):
        return recorded
    key = tuple(x.shape[1:])
    cache = _DEFAULTS.setdefault(model, {})
    if key not in cache:
        cache[key] = _last_spatial(model, x[:1])
    return cache[key]


def _last_spatial(model: nn.Module, x: torch.Tensor) -> str:
    found: list = []
    handles = []
    for name, module in named_modules(model):

        def hook(module, inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
                found.append(name)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), forward_errors(model, x):
            eager_call(model, x)  # a compiled graph would not run the hooks
    finally:
        for h in handles:
            h.remove()
    found = [n for n in found if n]
    if not found:
        raise UnknownNameError(
            f"{type(model).__name__} has no module with a spatial (B, C, h, w) output; pass layer=... explicitly"
        )
    return found[-1]


def resolve_layer(model: nn.Module, layer: Optional[str], x: torch.Tensor) -> str:
    """The clean name of ``layer`` (or of the model's default layer for ``x`` when None), checked to exist."""
    name = default_layer(model, x) if layer is None else layer
    get_module(model, name)
    return clean_name(name)
