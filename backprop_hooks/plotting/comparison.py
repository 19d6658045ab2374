"""The method × target grid of ``bh.compare``: a row per sample and method (the image first), a column per
target, every panel divided by its limit so that one colour bar (±1) serves them all.

Which panels share a limit (``scale=``):

* ``"column"``: each method × target over the rows, so the rows compare (the classes of one image);
* ``"row"``: the targets of one method for one sample, so logit and contrast compare by magnitude (a contrast
  between close classes is often a few times weaker than the logit: on this scale it looks faint);
* ``"panel"``: every panel on its own (different images: a weak map next to a strong one stays visible).

Default: ``"column"`` when every row shows the same image (one image explained for several classes), else
``"panel"``. The limit is the method's (see :func:`~.explanations.method_scale`): max ``|value|``, or the 99th
percentile of ``|value|`` for pixel-space methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from ..errors import OptionError, choices
from . import labels
from .explanations import _blank, method_scale, under

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..api import Comparison

COMPARE_SCALES = ("column", "row", "panel")
SCALE_NOTES = {
    "column": "each method × target ÷ its limit over the rows",
    "row": "each method and row ÷ its limit over the targets (beneath each panel)",
    "panel": "each panel ÷ its own limit (beneath it)",
}


def limits(maps: torch.Tensor, percentiles: Sequence[float], scale: str) -> torch.Tensor:
    """(M, T, B) the limit of every panel of ``maps`` (M, T, B, H, W) under ``scale`` (module docstring)."""
    from .maps import symmetric_limit

    m, t, b = maps.shape[:3]
    out = torch.empty(m, t, b)
    for j in range(m):
        if scale == "column":
            out[j] = torch.tensor([symmetric_limit(maps[j, k], percentiles[j]) for k in range(t)])[:, None]
        elif scale == "row":
            out[j] = torch.tensor([symmetric_limit(maps[j, :, r], percentiles[j]) for r in range(b)])[None, :]
        else:
            panels = [[symmetric_limit(maps[j, k, r], percentiles[j]) for r in range(b)] for k in range(t)]
            out[j] = torch.tensor(panels)
    return out


def comparison_figure(
    comparison: Comparison,
    image: Any = None,
    class_names: Optional[Sequence[str]] = None,
    panel_size: float = 2.2,
    max_rows: int = 24,
    title: Optional[str] = None,
    dpi: int = 100,
    scale: Optional[str] = None,
    normalization: Any = None,
) -> Figure:
    """The method × target grid (see the module docstring); the unscaled maps are ``comparison.maps``.
    ``image``: default the explained input; ``normalization``: default the one the model declares."""
    from .maps import clean, new_figure, overlay, sign_of
    from .pictures import one_image, per_sample

    if scale is not None and scale not in COMPARE_SCALES:
        raise OptionError(f"unknown scale {scale!r} for a comparison; accepted: {choices(COMPARE_SCALES)}")
    methods, keys = comparison.methods, comparison.targets
    maps = comparison.maps.detach().float().cpu()  # (M, T, B, H, W)
    batch, size = maps.shape[2], tuple(maps.shape[3:])
    normalization = normalization if normalization is not None else comparison.normalization
    images = per_sample(comparison.image if image is None else image, batch, size, normalization)
    scale = scale or ("column" if one_image(images) else "panel")
    names = class_names if class_names is not None else comparison.class_names
    first = {m: comparison.explanations[m, keys[0]] for m in methods}
    percentiles = [method_scale(first[m])[1] for m in methods]
    limit = limits(maps, percentiles, scale)
    sign = sign_of(maps)
    row_list = [(b, j) for b in range(batch) for j in range(len(methods))][:max_rows]
    width = panel_size * (len(keys) + 1)
    side = (width - 0.7) / (len(keys) + 1)  # about a square panel's side, after the row labels (inches)
    fig = new_figure(layout="constrained", dpi=dpi, figsize=(width, (side + 0.06) * len(row_list) + 1.4))
    axes = fig.subplots(len(row_list), len(keys) + 1, squeeze=False)
    for r, (b, j) in enumerate(row_list):
        method = methods[j]
        e = first[method]
        alpha = method_scale(e)[0]
        picture = images[b] if images is not None else _blank(size)
        axes[r, 0].imshow(picture, cmap="gray", vmin=0, vmax=1)
        clean(axes[r, 0])
        c = int(e.classes[b])
        p = float(e.probabilities[b, c])
        unsigned = " (no sign)" if bool((maps[j, :, b] >= 0).all()) else ""
        axes[r, 0].set_ylabel(f"{method}{unsigned}\n{labels.class_label(c, names)}\np = {p:.3f}", fontsize=8)
        for k in range(len(keys)):
            panel = maps[j, k, b] / limit[j, k, b]
            artist = overlay(axes[r, k + 1], picture, panel, alpha=alpha, vmax=1.0, sign=sign)
            if scale != "column":
                axes[r, k + 1].set_xlabel(f"±{float(limit[j, k, b]):.2g}", fontsize=7, labelpad=1)
    axes[0, 0].set_title("image", fontsize=9)
    for k, key in enumerate(keys):
        heading = labels.target_title(key, names) if names is not None or not key.startswith("versus:") else key
        axes[0, k + 1].set_title(heading, fontsize=9)
    legend = "red: magnitude (no sign)" if sign == "positive" else "red: for t, blue: against t"
    pixel = "; pixel-space methods: the 99th percentile of |value|" if any(p < 100 for p in percentiles) else ""
    label = f"{legend}\nscale={scale!r}: {SCALE_NOTES[scale]}\n(limit: max |value|{pixel})"
    under(fig, artist, list(axes[:, 1:].flat), label)
    shown = "" if len(row_list) == batch * len(methods) else f" (the first {len(row_list)} rows)"
    fig.suptitle((title or "methods × targets") + shown, fontsize=10)
    return fig
