"""Command-line values, checked and resolved before anything runs or is written: method options
(``--option NAME=VALUE``), classes and ``versus:`` targets by index or name, the device."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

import backprop_hooks as bh
from backprop_hooks.errors import UsageError, choices

from .catalog import method_option_names


def parse_value(text: str) -> Any:
    """``--option`` values: int, float, true/false, none, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(method: str, items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``["n_steps=64", "post=signed"]`` -> ``{"n_steps": 64, "post": "signed"}``, checked against the method."""
    options: Dict[str, Any] = {}
    accepted = method_option_names(method)
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise UsageError(f"--option {item!r}: expected NAME=VALUE, e.g. --option n_steps=64")
        if name not in accepted:
            what = f"options: {choices(accepted)}" if accepted else "no options"
            hint = "; give the layer with --layer" if name == "layer" else ""
            raise UsageError(f"--option {name!r} is not an option of {method}; it takes {what}{hint}")
        options[name] = parse_value(value)
    return options


def check_method(method: str, layer: Optional[str], option_items: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The method's options (``layer`` and every ``--option``); raises for an unknown method, a layer it does not
    take or an option it does not know."""
    cls = bh.methods.get(method)
    options = parse_options(method, option_items)
    if layer is None:
        return options
    if not cls.takes_layer:
        with_layer = [m for m in bh.methods.available() if bh.methods.get(m).takes_layer]
        raise UsageError(f"method {method!r} takes no --layer; methods with a layer: {choices(with_layer)}")
    return {"layer": layer, **options}


def class_index(value: Any, names: Sequence[str], what: str = "--classes") -> int:
    """A class given by index (``281``) or by name (``tabby``, case-insensitive; unique prefixes too)."""
    text = str(value).strip()
    try:
        index = int(text)
    except ValueError:
        index = None
    if index is not None:
        check_class_range([index], len(names), what)
        return index
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    found = [i for i, n in enumerate(lowered) if n.startswith(text.lower()) or f", {text.lower()}" in n]
    if len(found) == 1:
        return found[0]
    if found:
        raise UsageError(
            f"{what}: {text!r} names several classes: {choices([f'{names[i]} ({i})' for i in found], 6)}; "
            "give the index or the full name"
        )
    listing = f"classes: {choices(names, 8)}" + (
        "; list them with: backprop-hooks models MODEL" if len(names) > 8 else ""
    )
    raise UsageError(f"{what}: no class is called {text!r}; give an index 0 to {len(names) - 1} or a name ({listing})")


def check_targets(targets: Sequence[str], num_classes: int, names: Optional[Sequence[str]] = None) -> List[str]:
    """Canonical target names without repeats; ``versus:S`` classes (by index or name) must exist."""
    names = list(names) if names is not None else [str(i) for i in range(num_classes)]
    resolved = []
    for t in targets:
        if str(t).startswith("versus:"):
            other = t.split(":", 1)[1]
            t = f"versus:{class_index(other, names, what=f'target {t!r}')}"
        resolved.append(t)
    return list(dict.fromkeys(bh.targets.get(t).key for t in resolved))


def check_class_range(classes: Sequence[int], num_classes: int, what: str = "--classes") -> None:
    """Raise :class:`~backprop_hooks.errors.UsageError` when a class index is outside ``0 .. num_classes - 1``."""
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(
            f"{what}: class {bad[0]} is out of range; the model has {num_classes} classes: 0 to {num_classes - 1}"
        )


def check_device(name: str) -> torch.device:
    """The device ``name`` names; :class:`~backprop_hooks.errors.UsageError` when it cannot hold a tensor here."""
    try:
        device = torch.device(name)
        if device.type == "meta":
            raise RuntimeError("meta tensors hold no data, so nothing can be computed on them")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise UsageError(f"device {name!r} is not available ({str(error).splitlines()[0]}); try 'cpu'") from None
    return device
