"""Heat-map overlays and figure grids for signed explanations.

Conventions (paper and review): maps are bilinearly upsampled to the input (``Explanation.maps``), drawn
over the image at alpha 0.5 with a diverging colour scale centred on zero: red positive, blue negative,
white zero, symmetric by the largest absolute value (``bwr`` with ``vmin = -m``, ``vmax = m``). A map
without sign (a magnitude: gradient norms, rollouts) is drawn in one hue on [0, m]: ``bwr``'s red half, so that
a red means the same strength in a signed panel beside it.
Pixel-space maps (gradients) use a scale clipped at a percentile of ``|value|``, each pixel as opaque as it is
strong (:func:`overlay` with ``alpha=None``).
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple, Union

import torch

from ..errors import require

np = require("numpy", "cli")

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn: `backprop-hooks --help` stays fast
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

ArrayLike = Union[torch.Tensor, "np.ndarray"]
#: The diverging colour map of every heat-map: red positive, blue negative, white zero.
CMAP = "bwr"
#: The resolution of saved figures, in dots per inch.
DPI = 120


@functools.lru_cache(maxsize=None)
def notebook_figure() -> type:
    """matplotlib's ``Figure`` with a ``_repr_png_``: a notebook shows it even where pyplot was never imported
    (where it was, IPython's own figure printer takes precedence: the picture is shown once either way). Made
    on first use, so that importing this module does not import matplotlib; pickled as ``maps.Figure``."""
    from matplotlib import figure

    class Figure(figure.Figure):
        def _repr_png_(self) -> bytes:
            return png(self)

    Figure.__qualname__ = "Figure"
    return Figure


def __getattr__(name: str):
    if name == "Figure":  # what unpickling a figure of ours looks up
        return notebook_figure()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def new_figure(**kwargs) -> Figure:
    """A figure outside pyplot (nothing to close; see :func:`notebook_figure`); raises MissingExtraError
    without matplotlib."""
    require("matplotlib", "cli")
    return notebook_figure()(**kwargs)


def to_numpy(array: ArrayLike) -> np.ndarray:
    """A float numpy array from a tensor (any device, detached) or an array."""
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


def image_hwc(image: Any, normalization: Any = None) -> np.ndarray:
    """An (H, W, 3) or (H, W) image in [0, 1] from any format a user has: a (3, H, W) / (H, W, 3) / (H, W)
    tensor or array, uint8 or float, 0-255 or [0, 1], a PIL image (see :mod:`.pictures`)."""
    from .pictures import to_picture

    return to_picture(image, normalization)


def sign_of(maps: ArrayLike) -> str:
    """``"positive"`` for maps that are never negative (a magnitude: gradient norms, rollouts), ``"negative"``
    for maps never positive, else ``"signed"`` (an all-zero map counts as signed)."""
    values = to_numpy(maps)
    if values.size and (values >= 0).all() and (values > 0).any():
        return "positive"
    if values.size and (values <= 0).all() and (values < 0).any():
        return "negative"
    return "signed"


def colour_range(sign: str, m: float) -> Tuple[Any, float, float]:
    """``(cmap, vmin, vmax)`` for maps of ``sign`` on the half-range ``m``: ``bwr`` on [-m, m] for signed maps,
    otherwise the half of ``bwr`` that holds values (white to red on [0, m], blue to white on [-m, 0])."""
    if sign == "signed":
        return CMAP, -m, m
    from matplotlib import colormaps
    from matplotlib.colors import LinearSegmentedColormap

    half = np.linspace(0.5, 1.0, 128) if sign == "positive" else np.linspace(0.0, 0.5, 128)
    cmap = LinearSegmentedColormap.from_list(f"{CMAP}_{sign}", colormaps[CMAP](half))
    return cmap, *((0.0, m) if sign == "positive" else (-m, 0.0))


def symmetric_limit(maps: ArrayLike, percentile: float = 100.0) -> float:
    """``max |value|`` over ``maps`` (any shape), the half-range of a zero-centred colour scale (> 0).

    With ``percentile`` < 100, the given percentile of ``|value|`` over the non-zero values instead: pixel-space
    maps (gradients) are dominated by a few extreme pixels, and a scale set by them shows faint speckle."""
    values = np.abs(to_numpy(maps))
    if percentile < 100:
        nonzero = values[values > 0]
        m = float(np.percentile(nonzero, percentile)) if nonzero.size else 0.0
    else:
        m = float(values.max(initial=0.0))
    return m if np.isfinite(m) and m > 0 else 1.0


def overlay(
    ax: Axes,
    image: ArrayLike,
    heatmap: ArrayLike,
    alpha: Optional[float] = 0.5,
    vmax: Optional[float] = None,
    sign: Optional[str] = None,
) -> AxesImage:
    """Draw ``heatmap`` (H, W) over ``image`` on ``ax`` (``vmax``: default max ``|heatmap|``), zero-centred ``bwr``
    for a signed map, one hue from zero for a map of one ``sign`` (default: the map's own, see :func:`sign_of`;
    maps that share a colour bar pass theirs together).

    ``alpha`` None: each pixel's opacity follows its strength, ``min(|value| / vmax, 1)``, over a faded grey
    copy of the image: pixel-space maps (gradients) stay readable, and where they are weak the image shows.
    Returns the heat-map's ``AxesImage`` (for a colour bar). Ticks are removed, the frame is kept.
    """
    heatmap = to_numpy(heatmap)
    if heatmap.ndim != 2:
        raise ValueError(f"expected a (H, W) heat-map, got shape {heatmap.shape}")
    m = symmetric_limit(heatmap) if vmax is None else vmax
    cmap, vmin, vmax = colour_range(sign or sign_of(heatmap), m)
    picture = image_hwc(image)
    if alpha is None:
        grey = picture.mean(-1) if picture.ndim == 3 else picture
        ax.imshow(0.55 + 0.45 * grey, cmap="gray", vmin=0, vmax=1)
        strength = np.clip(np.abs(heatmap) / m, 0.0, 1.0)
        artist = ax.imshow(heatmap, cmap=cmap, alpha=strength, vmin=vmin, vmax=vmax, interpolation="nearest")
        clean(ax)
        return artist
    ax.imshow(picture, cmap="gray", vmin=0, vmax=1)
    artist = ax.imshow(heatmap, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="bilinear")
    clean(ax)
    return artist


def clean(ax: Axes) -> None:
    """No ticks or tick labels (axis labels and titles still show)."""
    ax.set_xticks([])
    ax.set_yticks([])


def colorbar(fig: Figure, artist: AxesImage, label: str, cax: Optional[Axes] = None, ax=None, **place):
    """A colour bar of ``artist``'s scale: in ``cax``, or beside the axes ``ax`` (one or a list: the space is
    taken from them; ``place``: ``orientation``, ``shrink``, ``fraction``, ``pad`` as for ``fig.colorbar``).
    3 to 5 ticks (symmetric on a zero-centred scale), small type, ``label`` beside it."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.ticker import MaxNLocator

    place.setdefault("orientation", "horizontal")
    bar = fig.colorbar(ScalarMappable(artist.norm, artist.cmap), cax=cax, ax=ax, **place)
    bar.set_label(label, fontsize=7)
    axis = bar.ax.xaxis if place["orientation"] == "horizontal" else bar.ax.yaxis
    centred = artist.norm.vmin == -artist.norm.vmax
    axis.set_major_locator(MaxNLocator(nbins=4, symmetric=centred, min_n_ticks=3))
    axis.set_major_formatter("{x:.2g}")
    bar.ax.tick_params(labelsize=7)
    return bar


def explanation_grid(
    image: ArrayLike,
    columns: Sequence[ArrayLike],
    column_titles: Sequence[str],
    row_labels: Sequence[str],
    colorbar_labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    alpha: Optional[float] = 0.5,
    panel_size: float = 2.4,
    percentile: float = 100.0,
) -> Figure:
    """A figure of one image and its maps: a row per class, the image first, then one column per map kind.

    ``columns[j]`` holds the (rows, H, W) maps of column ``j`` (e.g. one target for every class); each
    column shares one zero-centred scale (symmetric by its max ``|value|``; from zero in one hue for a column
    without sign), shown in a colour bar below it, so the rows of a column compare directly. ``row_labels``
    label the rows (class names, probabilities). ``percentile`` < 100 clips the scale at that percentile of
    ``|value|`` (said in the colour bar); ``alpha`` None makes each pixel as opaque as it is strong (for
    pixel-space maps, see :func:`overlay`).
    """
    columns = [to_numpy(c) for c in columns]
    rows = len(row_labels)
    if len(column_titles) != len(columns) or any(c.shape[0] != rows for c in columns):
        raise ValueError("need one title per column and one map per row in every column")
    fig = new_figure(
        layout="constrained",
        dpi=DPI,
        figsize=(panel_size * (len(columns) + 1), panel_size * (rows + 0.25) + 0.6),
    )
    grid = fig.subplots(rows + 1, len(columns) + 1, squeeze=False, gridspec_kw={"height_ratios": [1.0] * rows + [0.06]})
    axes, bars = grid[:-1], grid[-1]  # the last row holds the colour bars
    bars[0].axis("off")
    image = image_hwc(image)
    for r, label in enumerate(row_labels):
        axes[r, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
        clean(axes[r, 0])
        axes[r, 0].set_ylabel(label, fontsize=9)
    axes[0, 0].set_title("image", fontsize=10)
    for j, maps in enumerate(columns, start=1):
        m, sign = symmetric_limit(maps, percentile), sign_of(maps)
        for r in range(rows):
            artist = overlay(axes[r, j], image, maps[r], alpha=alpha, vmax=m, sign=sign)
        axes[0, j].set_title(column_titles[j - 1], fontsize=10)
        label = colorbar_labels[j - 1] if colorbar_labels else "attribution (red +, blue −)"
        if percentile < 100:
            label += f"\nscale: ±{percentile:g}th percentile of |value|"
        colorbar(fig, artist, label, cax=bars[j])
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def png(fig: Figure, dpi: Optional[int] = None) -> bytes:
    """``fig`` as PNG bytes (rendered in memory)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi or fig.dpi)
    return buffer.getvalue()


def save(fig: Figure, path, dpi: int = DPI) -> None:
    """Write ``fig`` to ``path`` (format from the suffix); a pyplot figure is closed afterwards."""
    try:
        fig.savefig(path, dpi=dpi)
    finally:
        if fig.canvas.manager is not None:  # made by pyplot: drop it from pyplot's figures
            from matplotlib import pyplot as plt

            plt.close(fig)
