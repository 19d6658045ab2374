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


def versus_of(e, i: int) -> Optional[int]:
    """The class ``s`` of sample ``i`` of a Versus explanation ("t and not s"), or None for another target."""
    other = e.extras.get("versus") if e.target == "versus" else None
    return None if other is None else int(torch.as_tensor(other).reshape(-1).cpu().expand(e.classes.shape[0])[i])


def what(e, i: int, class_names: Optional[Sequence[str]] = None) -> str:
    """The explained objective of sample ``i`` of the explanation ``e`` in words: ``"tabby (281), weighted
    contrast"``, or ``"Egyptian cat (285) and not tabby (281)"`` for a Versus target."""
    label = class_label(int(e.classes[i]), class_names)
    other = versus_of(e, i)
    if other is not None:
        return f"{label} and not {class_label(other, class_names)}"
    return f"{label}, {TARGET_TITLES.get(e.target, e.target)}"


def target_title(key: str, class_names: Sequence[str]) -> str:
    """A column header: ``"logit (original)"``, ``"weighted contrast"``, ``"versus tabby (281)"``."""
    if key.startswith("versus:"):
        other = int(key.split(":")[1])
        return f"versus {class_names[other]} ({other})"
    return TARGET_TITLES.get(key, key)


def objective(key: str) -> str:
    """The objective a target explains, as mathtext for colour-bar labels (``versus:281`` -> ``y_t - y_281``)."""
    return f"$y_t - y_{{{key.split(':')[1]}}}$" if key.startswith("versus:") else OBJECTIVES.get(key, key)


def scale_note(percentile: float = 100.0, shared: Optional[str] = None) -> str:
    """Which scale a figure draws: ``"scale: ±the 99th percentile of |value|"`` (``percentile`` < 100) or ``"±max
    |value|"``; ``shared`` says which panels share it (``"one for all panels"``) or, as ``"panel"``, that each
    panel is divided by its own limit (the bar then runs to ±1, each panel's limit in its title)."""
    limit = f"the {percentile:g}th percentile of |value|" if percentile < 100 else "max |value|"
    if shared == "panel":
        return f"scale: each panel ÷ its own {limit} (in its title)"
    return f"scale: ±{limit}" + (f", {shared}" if shared else "")


def legend(maps: torch.Tensor, who: str = "t") -> str:
    """What the colours of ``maps`` mean: ``"red: for t, blue: against t"`` for a signed map (``who``: the
    explained class, on two lines when it is named); a map that is never negative is a magnitude, one that is
    never positive says so."""
    if bool((maps >= 0).all()):
        return "red: magnitude (this map has no sign)"
    if bool((maps <= 0).all()):
        return "blue: all values are negative"
    return f"red: for {who}, blue: against {who}" if who == "t" else f"red: for {who}\nblue: against {who}"
