"""Heat-map overlays and figure grids: :mod:`backprop_hooks.plotting.maps`, importable from here as before."""

from backprop_hooks.plotting.maps import (
    CMAP,
    DPI,
    clean,
    colorbar,
    explanation_grid,
    image_hwc,
    overlay,
    png,
    save,
    symmetric_limit,
    to_numpy,
)

__all__ = [
    "CMAP",
    "DPI",
    "clean",
    "colorbar",
    "explanation_grid",
    "image_hwc",
    "overlay",
    "png",
    "save",
    "symmetric_limit",
    "to_numpy",
]
