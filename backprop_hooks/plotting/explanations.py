"""``Explanation.plot``, the method × target grid of ``bh.compare`` and the inline views of a notebook.

The scale is the command line's: pixel-space maps (input-shaped attributions: gradient, I×G, SmoothGrad, IG,
FullGrad, the guided methods) on ±the 99th percentile of ``|value|``, each pixel as opaque as it is strong over a
faded image; layer and token-grid maps (the CAMs, the rollouts) on ±max ``|value|`` at opacity 0.5. Red is
evidence for the explained objective, blue against it, white zero; a map that is never negative is labelled
a magnitude. Several maps drawn together share one scale.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import InputError, OptionError
from . import labels
from . import tokens as token_views

if TYPE_CHECKING:  # the core imports this module lazily, never the other way round
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..api import Comparison
    from ..explanation import Explanation

INLINE_PANELS = 8  # a notebook's view of a batch draws at most this many maps
INLINE_DPI = 72


def is_pixel_space(e: Explanation) -> bool:
    """Whether ``e``'s attributions are at the input's pixels (input-shaped, or one (H, W) map per image and no
    layer), as opposed to a layer or token grid upsampled to the input."""
    shape, a = tuple(e.input_shape), e.attributions
    if len(shape) != 4:
        return False
    return tuple(a.shape) == shape or (e.layer is None and a.dim() == 3 and tuple(a.shape[1:]) == shape[2:])


def scale(e: Explanation) -> Tuple[Optional[float], float]:
    """``(alpha, percentile)`` of ``e``'s maps: ``(None, 99)`` in pixel space, else ``(0.5, 100)``."""
    return (None, 99.0) if is_pixel_space(e) else (0.5, 100.0)


def _class_names(e: Explanation, class_names: Optional[Sequence[str]]) -> Optional[Sequence[str]]:
    return class_names if class_names is not None else e.extras.get("class_names")


def _others(e: Explanation) -> Optional[torch.Tensor]:
    """(B,) the classes ``s`` of a Versus explanation ("t and not s"), or None."""
    other = e.extras.get("versus") if e.target == "versus" else None
    return None if other is None else torch.as_tensor(other).reshape(-1).cpu().expand(e.classes.shape[0])


def _versus(e: Explanation, i: int) -> Optional[int]:
    others = _others(e)
    return None if others is None else int(others[i])


def what(e: Explanation, i: int, class_names: Optional[Sequence[str]] = None) -> str:
    """The explained objective of sample ``i`` in words: ``"tabby (281)"`` with the target's title, or
    ``"Egyptian cat (285) and not tabby (281)"`` for a Versus target."""
    c = int(e.classes[i])
    label = labels.class_label(c, class_names)
    other = _versus(e, i)
    if other is not None:
        return f"{label} and not {labels.class_label(other, class_names)}"
    return f"{label}, {labels.TARGET_TITLES.get(e.target, e.target)}"


def _objective(e: Explanation) -> str:
    others = _others(e)
    if others is not None and bool((others == others[0]).all()):
        return labels.objective(f"versus:{int(others[0])}")
    return labels.objective(e.target) if e.target != "versus" else "$y_t - y_s$"


def _images(image: Any, batch: int, size: Tuple[int, int]) -> Optional[List[Any]]:
    """One image per sample from ``image`` ((B, C, H, W), one (C, H, W) / (H, W, C) / (H, W) image, or None)."""
    if image is None:
        return None
    if isinstance(image, torch.Tensor) and image.dim() == 4 or getattr(image, "ndim", 0) == 4:
        if image.shape[0] not in (1, batch):
            raise InputError(f"image holds {image.shape[0]} images for an explanation of {batch}")
        images = [image[min(i, image.shape[0] - 1)] for i in range(batch)]
    else:
        images = [image] * batch
    from .maps import image_hwc

    if image_hwc(images[0]).shape[:2] != tuple(size):
        raise InputError(f"image of shape {tuple(image.shape)} does not match the maps' size {tuple(size)}")
    return images


def _blank(size: Tuple[int, int]) -> torch.Tensor:
    return torch.ones(size)


def plot(
    e: Explanation,
    image: Any = None,
    ax: Optional[Axes] = None,
    *,
    index: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    tokens: token_views.Tokens = None,
    alpha: Optional[float] = None,
    percentile: Optional[float] = None,
    title: Optional[str] = None,
    colorbar: bool = True,
    columns: int = 4,
    max_panels: int = 32,
    panel_size: float = 2.6,
    dpi: int = 100,
) -> Union[Figure, Axes]:
    """See :meth:`backprop_hooks.Explanation.plot`."""
    if "input_ids" in e.extras:
        if ax is not None:
            raise OptionError("a token explanation draws a figure of its own: call plot() without ax=")
        names = _class_names(e, class_names)
        rows = token_views.rows(e, tokens if tokens is not None else e.extras.get("tokens"), names)
        return token_views.figure(rows, dpi=dpi)
    if len(e.input_shape) != 4:
        raise InputError(
            f"plot draws image explanations (input (B, C, H, W)) and token explanations (bh.explain_text); this "
            f"one explains an input of shape {tuple(e.input_shape)}: its maps are e.maps"
        )
    from .maps import new_figure, symmetric_limit

    maps = e.maps.detach().float().cpu()
    batch, size = maps.shape[0], tuple(maps.shape[1:])
    images = _images(image, batch, size)
    names = _class_names(e, class_names)
    default_alpha, default_percentile = scale(e)
    if alpha is None and images is not None:
        alpha = default_alpha
    elif alpha is None:
        alpha = None if default_alpha is None else 1.0  # no image under a layer map: opaque
    percentile = default_percentile if percentile is None else percentile
    if index is not None and not -batch <= index < batch:
        raise InputError(f"index {index} is out of range for a batch of {batch} explanations")
    chosen = [index % batch] if index is not None else list(range(min(batch, max_panels)))
    if ax is not None and len(chosen) != 1:
        raise OptionError(f"a batch of {batch} explanations draws a grid: call plot() without ax=, or pass index=")
    vmax = symmetric_limit(maps[chosen], percentile)
    single = len(chosen) == 1
    label = f"{e.method} of {_objective(e)}\n" + labels.legend(
        maps[chosen], labels.class_label(int(e.classes[chosen[0]]), names) if single else "t"
    )
    if percentile < 100:
        label += f"\nscale: ±{percentile:g}th percentile of |value|"
    probabilities = e.probabilities.detach().cpu()

    def draw(axis: Axes, i: int, heading: str):
        from .maps import overlay

        picture = images[i] if images is not None else _blank(size)
        artist = overlay(axis, picture, maps[i], alpha=alpha, vmax=vmax)
        p = float(probabilities[i, int(e.classes[i])])
        axis.set_title(f"{heading}{what(e, i, names)}\np = {p:.3f}", fontsize=8)
        return artist

    layer = f" at {e.layer}" if e.layer else ""
    if ax is not None:
        artist = draw(ax, chosen[0], f"{e.method}{layer}\n" if title is None else f"{title}\n")
        if colorbar:
            _colorbar(ax.figure, artist, ax, label, "vertical")
        return ax
    cols = min(len(chosen), max(1, columns))
    rows = math.ceil(len(chosen) / cols)
    fig = new_figure(layout="constrained", dpi=dpi, figsize=(panel_size * cols + 1.1, panel_size * rows + 0.5))
    grid = fig.subplots(rows, cols, squeeze=False)
    for k, axis in enumerate(grid.flat):
        if k >= len(chosen):
            axis.axis("off")
            continue
        artist = draw(axis, chosen[k], f"{chosen[k]}: " if not single else "")
    heading = f"{e.method}{layer}" if title is None else title
    if len(chosen) < batch:
        heading += f" (the first {len(chosen)} of {batch})"
    fig.suptitle(heading, fontsize=10)
    if colorbar:
        _colorbar(fig, artist, list(grid.flat), label, "vertical")
    return fig


def _colorbar(fig, artist, ax, label: str, orientation: str):
    """A colour bar beside ``ax``: a vertical one at 0.9 of the height, a horizontal one 0.3 inch thick and
    close to the panels above it, however tall the figure."""
    from .maps import colorbar

    if orientation == "vertical":
        return colorbar(fig, artist, label, ax=ax, orientation=orientation, shrink=0.9)
    height = fig.get_size_inches()[1]
    size = dict(shrink=0.6, fraction=min(0.15, 0.3 / height), pad=min(0.15, 0.15 / height))
    return colorbar(fig, artist, label, ax=ax, orientation=orientation, **size)


def comparison_figure(
    comparison: Comparison,
    image: Any = None,
    class_names: Optional[Sequence[str]] = None,
    panel_size: float = 2.2,
    max_rows: int = 24,
    title: Optional[str] = None,
    dpi: int = 100,
) -> Figure:
    """The method × target grid: a row per sample and method (the image first), a column per target. Each
    method × target is scaled to ±1 by its own limit over the batch (the method's percentile, see
    :func:`scale`), so one colour bar serves every panel; the unscaled maps are ``comparison.maps``."""
    from .maps import clean, image_hwc, new_figure, overlay, symmetric_limit

    methods, keys = comparison.methods, comparison.targets
    maps = comparison.maps.detach().float().cpu()  # (M, T, B, H, W)
    batch, size = maps.shape[2], tuple(maps.shape[3:])
    images = _images(comparison.image if image is None else image, batch, size)
    names = class_names if class_names is not None else comparison.class_names
    first = {m: comparison.explanations[m, keys[0]] for m in methods}
    percentiles = [scale(first[m])[1] for m in methods]
    limits = [[symmetric_limit(maps[j, k], percentiles[j]) for k in range(len(keys))] for j in range(len(methods))]
    row_list = [(b, j) for b in range(batch) for j in range(len(methods))][:max_rows]
    width = panel_size * (len(keys) + 1)
    side = (width - 0.7) / (len(keys) + 1)  # about a square panel's side, after the row labels (inches)
    fig = new_figure(layout="constrained", dpi=dpi, figsize=(width, (side + 0.06) * len(row_list) + 1.3))
    axes = fig.subplots(len(row_list), len(keys) + 1, squeeze=False)
    for r, (b, j) in enumerate(row_list):
        method = methods[j]
        e = first[method]
        alpha = scale(e)[0]
        picture = images[b] if images is not None else _blank(size)
        axes[r, 0].imshow(image_hwc(picture), cmap="gray", vmin=0, vmax=1)
        clean(axes[r, 0])
        c = int(e.classes[b])
        p = float(e.probabilities[b, c])
        unsigned = " (no sign)" if bool((maps[j, :, b] >= 0).all()) else ""
        axes[r, 0].set_ylabel(f"{method}{unsigned}\n{labels.class_label(c, names)}\np = {p:.3f}", fontsize=8)
        for k in range(len(keys)):
            artist = overlay(axes[r, k + 1], picture, maps[j, k, b] / limits[j][k], alpha=alpha, vmax=1.0)
    axes[0, 0].set_title("image", fontsize=9)
    for k, key in enumerate(keys):
        heading = labels.target_title(key, names) if names is not None or not key.startswith("versus:") else key
        axes[0, k + 1].set_title(heading, fontsize=9)
    label = (
        "red: for t, blue: against t\neach method × target on its own scale: ±1 = its max |value| over the rows\n"
        "(pixel-space methods: the 99th percentile of |value|)"
    )
    _colorbar(fig, artist, list(axes[:, 1:].flat), label, "horizontal")
    shown = "" if len(row_list) == batch * len(methods) else f" (the first {len(row_list)} rows)"
    fig.suptitle((title or "methods × targets") + shown, fontsize=10)
    return fig


def inline_png(e: Explanation) -> Optional[bytes]:
    """A small PNG of ``e`` for a notebook (its maps alone, at most 8), or None for an input it cannot draw."""
    if "input_ids" not in e.extras and len(e.input_shape) != 4:
        return None
    from .maps import png

    fig = plot(e, max_panels=INLINE_PANELS, panel_size=2.0, dpi=INLINE_DPI)
    return png(fig)


def inline_html(e: Explanation) -> Optional[str]:
    """The token heat-map of a text explanation as HTML (no matplotlib needed), else None (the PNG shows)."""
    if "input_ids" not in e.extras:
        return None
    return token_views.fragment(token_views.rows(e, e.extras.get("tokens"), e.extras.get("class_names")))
