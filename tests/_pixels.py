"""Reading a figure's pixels: the checks of the plotting tests (rendered to PNG in memory, read back)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from backprop_hooks.plotting.maps import png


def pixels(fig) -> np.ndarray:
    """(H, W, 3) int array of ``fig`` rendered to PNG at its own dpi (the layout is done by then)."""
    return np.asarray(Image.open(io.BytesIO(png(fig))).convert("RGB"), dtype=int)


def box(fig, ax, image: np.ndarray) -> np.ndarray:
    """The pixels inside ``ax`` (read after rendering, so constrained layout has placed it)."""
    x0, y0, x1, y1 = ax.get_window_extent().extents
    h = image.shape[0]
    return image[int(h - y1) + 2 : int(h - y0) - 2, int(x0) + 2 : int(x1) - 2]


def red(region: np.ndarray) -> int:
    """Pixels whose red clearly exceeds green and blue (a red map over any grey, however dark)."""
    r, g, b = region[..., 0], region[..., 1], region[..., 2]
    return int((r - np.maximum(g, b) > 50).sum())


def blue(region: np.ndarray) -> int:
    r, g, b = region[..., 0], region[..., 1], region[..., 2]
    return int((b - np.maximum(r, g) > 50).sum())


def colour_bar_lines(image: np.ndarray, length: int = 40) -> int:
    """How many rows and columns hold a run of ``bwr`` colours (one of red and blue at full strength, the other
    two channels equal) of at least ``length`` pixels that goes monotonically from blue (< -0.8) to red (> 0.8)."""
    found = 0
    for lines in (image, image.transpose(1, 0, 2)):
        r, g, b = lines[..., 0], lines[..., 1], lines[..., 2]
        on_scale = (np.maximum(r, b) > 235) & (np.abs(g - np.minimum(r, b)) < 24)
        s = (r - b) / 255.0
        for i in range(lines.shape[0]):
            edges = np.flatnonzero(np.diff(np.r_[0, on_scale[i].astype(int), 0]))
            for start, stop in zip(edges[::2], edges[1::2]):
                run = s[i, start:stop]
                if stop - start < length or not (run.min() < -0.8 and run.max() > 0.8):
                    continue
                steps = np.diff(run)
                if (steps >= -0.05).all() or (steps <= 0.05).all():
                    found += 1
                    break
    return found


def square_panels(image: np.ndarray, least: int = 30) -> int:
    """Panels: connected regions of non-white pixels whose bounding box is at least ``least`` pixels and about
    square (a map, an image), which leaves out text and the elongated colour bars."""
    from scipy import ndimage

    ink = (image < 235).any(axis=-1)
    labelled, _ = ndimage.label(ink)
    count = 0
    for rows, cols in ndimage.find_objects(labelled):
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if min(h, w) >= least and 0.8 < h / w < 1.25:
            count += 1
    return count
