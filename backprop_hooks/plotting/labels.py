"""The words of a figure: what a target explains, which class, and what the colours mean."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

TARGET_TITLES = {
    "logit": "logit (original)",
    "weighted": "weighted contrast",
    "mean": "mean contrast",
    "max": "max contrast (vs runner-up)",
    "softmax": "softmax probability",
    "log_softmax": "log-softmax",
}
OBJECTIVES = {  # matplotlib mathtext
    "logit": r"$y_t$",
    "weighted": r"$y_t - \sum_{s \neq t} \alpha_s y_s$",
    "mean": r"$y_t - \mathrm{mean}_{s \neq t}\, y_s$",
    "max": r"$y_t - y_{s^*}$",
    "softmax": r"$p_t$",
    "log_softmax": r"$\log p_t$",
}


def named_class(index: int, name: Optional[str] = None) -> str:
    """``"tabby (281)"``, or ``"class 3"`` for a class without a name or named by its index."""
    return f"class {index}" if name is None or str(name) == str(index) else f"{name} ({index})"


def class_label(index: int, class_names: Optional[Sequence[str]] = None) -> str:
    """:func:`named_class` with the name from ``class_names`` (when it has one for ``index``)."""
    known = class_names is not None and 0 <= index < len(class_names)
    return named_class(index, class_names[index] if known else None)


def target_title(key: str, class_names: Sequence[str]) -> str:
    """A column header: ``"logit (original)"``, ``"weighted contrast"``, ``"versus tabby (281)"``."""
    if key.startswith("versus:"):
        other = int(key.split(":")[1])
        return f"versus {class_names[other]} ({other})"
    return TARGET_TITLES.get(key, key)


def objective(key: str) -> str:
    """The objective a target explains, as mathtext for colour-bar labels (``versus:281`` -> ``y_t - y_281``)."""
    return f"$y_t - y_{{{key.split(':')[1]}}}$" if key.startswith("versus:") else OBJECTIVES.get(key, key)


def legend(maps: torch.Tensor, who: str = "t") -> str:
    """What the colours of ``maps`` mean: ``"red: for t, blue: against t"`` for a signed map (``who``: the
    explained class, on two lines when it is named); a map that is never negative is a magnitude, one that is
    never positive says so."""
    if bool((maps >= 0).all()):
        return "red: magnitude (this map has no sign)"
    if bool((maps <= 0).all()):
        return "blue: all values are negative"
    return f"red: for {who}, blue: against {who}" if who == "t" else f"red: for {who}\nblue: against {who}"
