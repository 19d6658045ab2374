"""The one-call API: :func:`explain` (any method x any target) and :func:`compare` (methods x targets, one
figure and the tensors behind it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import methods as _methods
from . import targets as _targets
from .errors import OptionError
from .explanation import Explanation
from .validate import Classes, LogitsFn


def explain(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "gradient",
    target: Any = "logit",
    classes: Classes = None,
    logits: Optional[LogitsFn] = None,
    **options: Any,
) -> Explanation:
    """Explain ``model`` at ``x`` with any method and any target, in one forward and one backward pass.

    ``classes=None`` explains the predicted class; ``options`` go to the method (``layer=...``,
    ``relu=...``, ``n_steps=...``). The logits are the model's output when it is a (B, C) tensor, its
    tensor ``.logits`` (Hugging Face) or its ``"logits"`` key; for anything else pass ``logits=fn``
    (output -> (B, C)), e.g. ``logits=lambda out: out[0]``. Token ids go to :func:`backprop_hooks.explain_text`,
    which reads a causal LM's next token after each row's last real token.
    """
    _methods.get(method).check_options(options, ("target", "classes", "logits"), "bh.explain")
    return _methods.create(method, model, **options)(x, classes=classes, target=target, logits=logits)


@dataclass
class Comparison:
    """What :func:`compare` returns: every method x target explanation of one batch, the figure and the tensors.

    ``explanations[method, key]``: the (B, ...) explanation (``key``: the target's canonical name);
    ``maps``: (M, T, B, H, W), the maps behind the figure, unscaled; ``plot()``: the figure (a notebook shows
    it inline).
    """

    explanations: Dict[Tuple[str, str], Explanation]
    methods: List[str]
    targets: List[str]
    image: torch.Tensor  # (B, C, H, W): the explained inputs
    class_names: Optional[List[str]] = None
    normalization: Any = None  # what undoes a normalised image for the figure (the model's, when it declares one)

    @property
    def classes(self) -> torch.Tensor:
        """(B,) the explained classes (the same for every method and target)."""
        return self.explanations[self.methods[0], self.targets[0]].classes

    @property
    def maps(self) -> torch.Tensor:
        """(M, T, B, H, W): ``maps[i, j]`` are the maps of method ``i`` and target ``j``."""
        return torch.stack([torch.stack([self.explanations[m, t].maps for t in self.targets]) for m in self.methods])

    def plot(self, image: Any = None, **options: Any):
        """The grid: a row per sample and method (the image first), a column per target, one colour bar (each
        panel divided by its limit). ``scale``: which panels share a limit, ``"column"`` (each method x target
        over the rows), ``"row"`` (a sample's targets of one method: logit vs contrast by magnitude) or
        ``"panel"``; default ``"column"`` when every row shows one image, else ``"panel"``. ``image`` (default: the
        explained input) in any format (tensor or array, uint8 or float, a PIL image); a normalised one is
        undone with ``normalization=`` ((mean, std), an image processor) or the model's own. Other
        ``options``: ``class_names``, ``panel_size``, ``max_rows``, ``title``, ``dpi``. Returns a matplotlib
        ``Figure`` (needs the ``cli`` extra)."""
        from .plotting.comparison import comparison_figure

        return comparison_figure(self, image, **options)

    def _repr_png_(self) -> Optional[bytes]:
        try:
            from .plotting.maps import png

            return png(self.plot(dpi=72))
        except Exception:  # a notebook's view must never raise: the text repr shows instead
            return None

    def __repr__(self) -> str:
        size = tuple(self.explanations[self.methods[0], self.targets[0]].maps.shape)
        return (
            f"Comparison(methods={self.methods}, targets={self.targets}, classes={self.classes.tolist()}, "
            f"maps={(len(self.methods), len(self.targets), *size)})"
        )


def model_class_names(model: nn.Module) -> Optional[List[str]]:
    """The class names a model carries: ``model.class_names`` (backprop_hooks.models) or a Hugging Face
    config's ``id2label``; None when it has neither (or only transformers' ``LABEL_0``, ``LABEL_1``...)."""
    names = getattr(model, "class_names", None)
    if names is not None:
        return list(names)
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if isinstance(id2label, dict) and id2label:
        names = [str(id2label.get(i, i)) for i in range(max(int(k) for k in id2label) + 1)]
        return None if names == [f"LABEL_{i}" for i in range(len(names))] else names  # transformers' placeholders
    return None


def compare(
    model: nn.Module,
    x: torch.Tensor,
    methods: Sequence[str] = ("gradcam",),
    targets: Sequence[Any] = ("logit", "weighted"),
    classes: Classes = None,
    *,
    class_names: Optional[Sequence[str]] = None,
    logits: Optional[LogitsFn] = None,
    options: Optional[Dict[str, Dict[str, Any]]] = None,
) -> Comparison:
    """Explain ``x`` with every method x target: one :func:`explain` call each, all for the same classes.

    ``classes=None``: the predicted classes (resolved once, so every method explains the same ones). One
    image (``x`` of batch 1) and several ``classes`` explain that image once per class (the rows of the
    figure). ``options``: per-method options, ``{"gradcam": {"layer": "layer4"}}``. ``class_names``
    (default: the model's ``class_names``) name the classes in the figure and in each
    explanation's plot.
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    targets = [targets] if isinstance(targets, (str, _targets.Target)) else list(targets)
    options = dict(options or {})
    if not methods or not targets:
        raise OptionError("compare needs at least one method and one target")
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise OptionError(f"options are given for {unknown}, which are not among the methods {methods}")
    for method in methods:
        _methods.get(method).check_options(options.get(method, {}))
    keys = list(dict.fromkeys(_targets.get(t).key for t in targets))
    if classes is not None and isinstance(x, torch.Tensor) and x.dim() > 1 and x.shape[0] == 1:
        count = torch.as_tensor(classes).numel()
        x = x.expand(count, *x.shape[1:]) if count > 1 else x
    names = list(class_names) if class_names is not None else model_class_names(model)
    explanations: Dict[Tuple[str, str], Explanation] = {}
    for method in methods:
        for key in keys:
            e = explain(model, x, method, key, classes, logits, **options.get(method, {}))
            classes = e.classes
            explanations[method, key] = e.named(class_names=names) if names is not None else e
    return Comparison(explanations, methods, keys, x.detach(), names, declared_normalization(model))


def declared_normalization(model: nn.Module) -> Optional[Tuple[List[float], List[float]]]:
    """``(mean, std)`` of the inputs a model takes when it declares them (a timm model's ``pretrained_cfg``),
    else None; used only to draw an image that is normalised."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
        return list(cfg["mean"]), list(cfg["std"])
    return None
