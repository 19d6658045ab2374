"""``Explanation.plot``, the method × target grid of ``bh.compare`` and the inline views of a notebook.

The scale is the command line's: pixel-space maps (input-shaped attributions: gradient, I×G, SmoothGrad, IG,
FullGrad, the guided methods) on ±the 99th percentile of ``|value|``, each pixel as opaque as it is strong over a
faded image; layer and token-grid maps (the CAMs, the rollouts) on ±max ``|value|`` at opacity 0.5. Red is
evidence for the explained objective, blue against it, white zero; a map that is never negative is a
magnitude, drawn in red alone from zero.

Which panels share a scale (``scale=``): panels of one image (one image explained for several classes) share
one, so the classes compare; panels of different images each get their own, so that a weak map next to a
strong one does not look empty. The colour bar says which is drawn.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple, Union

import torch

from ..errors import InputError, OptionError, choices
from . import labels
from . import tokens as token_views

if TYPE_CHECKING:  # the core imports this module lazily, never the other way round
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..explanation import Explanation

INLINE_PANELS = 8  # a notebook's view of a batch draws at most this many maps
INLINE_DPI = 72


PLOT_SCALES = ("panel", "shared")


def is_pixel_space(e: Explanation) -> bool:
    """Whether ``e``'s attributions are at the input's pixels (input-shaped, or one (H, W) map per image and no
    layer), as opposed to a layer or token grid upsampled to the input."""
    shape, a = tuple(e.input_shape), e.attributions
    if len(shape) != 4:
        return False
    return tuple(a.shape) == shape or (e.layer is None and a.dim() == 3 and tuple(a.shape[1:]) == shape[2:])


def method_scale(e: Explanation) -> Tuple[Optional[float], float]:
    """``(alpha, percentile)`` of ``e``'s maps: ``(None, 99)`` in pixel space, else ``(0.5, 100)``."""
    return (None, 99.0) if is_pixel_space(e) else (0.5, 100.0)


def _class_names(e: Explanation, class_names: Optional[Sequence[str]]) -> Optional[Sequence[str]]:
    return class_names if class_names is not None else e.extras.get("class_names")


def _others(e: Explanation) -> Optional[torch.Tensor]:
    """(B,) the classes ``s`` of a Versus explanation ("t and not s"), or None."""
    other = e.extras.get("versus") if e.target == "versus" else None
    return None if other is None else torch.as_tensor(other).reshape(-1).cpu().expand(e.classes.shape[0])


def what(e: Explanation, i: int, class_names: Optional[Sequence[str]] = None) -> str:
    """See :func:`.labels.what`."""
    return labels.what(e, i, class_names)


def _objective(e: Explanation) -> str:
    others = _others(e)
    if others is not None and bool((others == others[0]).all()):
        return labels.objective(f"versus:{int(others[0])}")
    return labels.objective(e.target) if e.target != "versus" else "$y_t - y_s$"


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
    scale: Optional[str] = None,
    normalization: Any = None,
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
        return token_views.figure(rows, dpi=dpi, scale=scale or "robust")
    if len(e.input_shape) != 4:
        raise InputError(
            f"plot draws image explanations (input (B, C, H, W)) and token explanations (bh.explain_text); this "
            f"one explains an input of shape {tuple(e.input_shape)}: its maps are e.maps"
        )
    if scale is not None and scale not in PLOT_SCALES:
        raise OptionError(f"unknown scale {scale!r} for an image explanation; accepted: {choices(PLOT_SCALES)}")
    from .maps import new_figure, sign_of, symmetric_limit
    from .pictures import one_image, per_sample

    maps = e.maps.detach().float().cpu()
    batch, size = maps.shape[0], tuple(maps.shape[1:])
    images = per_sample(image, batch, size, normalization)
    names = _class_names(e, class_names)
    default_alpha, default_percentile = method_scale(e)
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
    single = len(chosen) == 1
    scale = scale or ("shared" if one_image(images) else "panel")
    per_panel = scale == "panel" and not single
    limits = {i: symmetric_limit(maps[i] if per_panel else maps[chosen], percentile) for i in chosen}
    sign = sign_of(maps[chosen])
    label = f"{e.method} of {_objective(e)}\n" + labels.legend(
        maps[chosen], labels.class_label(int(e.classes[chosen[0]]), names) if single else "t"
    )
    if not single or percentile < 100:
        shared = "panel" if per_panel else None if single else "one for all panels"
        label += "\n" + labels.scale_note(percentile, shared)
    probabilities = e.probabilities.detach().cpu()

    def draw(axis: Axes, i: int, heading: str):
        from .maps import overlay

        picture = images[i] if images is not None else _blank(size)
        divisor = limits[i] if per_panel else 1.0
        artist = overlay(axis, picture, maps[i] / divisor, alpha=alpha, vmax=limits[i] / divisor, sign=sign)
        p = float(probabilities[i, int(e.classes[i])])
        own = f", ±{limits[i]:.2g}" if per_panel else ""
        objective = what(e, i, names)
        if ax is not None:  # a user's panel may be narrow: the target on a line of its own
            objective = "\n".join(part for part in objective.rpartition(", ")[::2] if part)
        axis.set_title(f"{heading}{objective}\np = {p:.3f}{own}", fontsize=8)
        return artist

    layer = f" at {e.layer}" if e.layer else ""
    if ax is not None:
        artist = draw(ax, chosen[0], f"{e.method}{layer}\n" if title is None else f"{title}\n")
        if colorbar:
            clipped = "" if percentile == 100 else f", ±{percentile:g}th pct"
            below(ax, artist, labels.legend(maps[chosen], "t") + clipped)
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
        beside(fig, artist, list(grid.flat), label)
    return fig


BAR_THICKNESS = 0.14  # inches, whatever the figure's size
BAR_LENGTH = 4.0  # inches at most


def beside(fig, artist, axes, label: str):
    """A vertical colour bar right of ``axes`` (in a constrained layout): at most 4 inches long and 0.14 inch
    thick however many panels there are, centred on their height."""
    from .maps import colorbar

    height = fig.get_size_inches()[1]
    length = min(0.9 * height, BAR_LENGTH)
    place = dict(shrink=length / height, aspect=length / BAR_THICKNESS)
    return colorbar(fig, artist, label, ax=axes, orientation="vertical", **place)


def under(fig, artist, axes, label: str):
    """A horizontal colour bar under ``axes`` (in a constrained layout): 0.3 inch thick at most and close to the
    panels above it, however tall the figure."""
    from .maps import colorbar

    height = fig.get_size_inches()[1]
    size = dict(shrink=0.6, fraction=min(0.15, 0.3 / height), pad=min(0.15, 0.15 / height))
    return colorbar(fig, artist, label, ax=axes, orientation="horizontal", **size)


def below(ax: Axes, artist, label: str):
    """A colour bar inside the bottom of ``ax``'s own place (a user's ``plt.subplots``, any layout): the space
    is taken from ``ax``, and the ticks and the one-line ``label`` sit between the map and the bar, so nothing
    reaches into a neighbouring panel."""
    from .maps import colorbar

    fig = ax.figure
    width, height = ax.get_position().size * fig.get_size_inches()  # inches
    text = 7 / 72 * 2.8  # the tick labels and the label line above the bar
    place = dict(fraction=0.1 / height, pad=text / height, shrink=0.9, aspect=0.9 * width / 0.1)
    bar = colorbar(fig, artist, label, ax=ax, orientation="horizontal", location="bottom", **place)
    bar.ax.xaxis.set_ticks_position("top")
    bar.ax.xaxis.set_label_position("top")
    return bar


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
