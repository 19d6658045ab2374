"""Reports shared by the experiments: per-sample statistics, Markdown/CSV/JSON tables, figures.

Statistics are per sample: the mean of ``n`` per-sample values and its 95 % confidence interval
``mean ± t_{0.975, n-1} · sd / √n`` (Student t; the normal quantile 1.96 for large n).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from backprop_hooks.plotting import maps as plots
from backprop_hooks.files import atomic_write

Row = Dict[str, Any]


# ---- statistics --------------------------------------------------------------------------------------


def t_quantile(n: int, level: float = 0.95) -> float:
    """Two-sided Student-t quantile for ``n`` samples (nan for n < 2)."""
    if n < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1))


def mean_ci(values: torch.Tensor, level: float = 0.95) -> Tuple[float, float]:
    """Per-sample mean of a 1-D tensor (NaNs dropped) and the half-width of its confidence interval."""
    values = values.double().flatten()
    values = values[~values.isnan()]
    n = values.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = float(values.mean())
    if n < 2:
        return mean, float("nan")
    return mean, t_quantile(n, level) * float(values.std(unbiased=True)) / math.sqrt(n)


# ---- configuration -----------------------------------------------------------------------------------


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict: every entry's name, dtype, shape and raw bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def versions() -> Dict[str, str]:
    """Versions of python, torch, torchvision, timm and backprop_hooks (for the report)."""
    import torchvision

    import backprop_hooks

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "backprop_hooks": backprop_hooks.__version__,
    }
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


# ---- tables ------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``.716``-style for floats, ``-`` for nan/None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (folders made as needed)."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented JSON, atomically (non-JSON values as their ``str``)."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """Rows (dicts) as CSV; the columns are the union of the keys, in first-seen order."""
    columns: List[str] = list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    atomic_write(Path(path), write)


# ---- figures -----------------------------------------------------------------------------------------


def grouped_bars(
    ax, groups: Sequence[str], series: Dict[str, Tuple[Sequence[float], Sequence[float]]], ylabel: str, title: str
) -> None:
    """Bars of several series (label -> (means, CI half-widths)) side by side in each group."""
    import numpy as np

    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, (means, errors)) in enumerate(series.items()):
        errors = [0.0 if e is None or (isinstance(e, float) and math.isnan(e)) else e for e in errors]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=errors, capsize=2, label=label)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.axhline(0, color="black", linewidth=0.5)


def example_grid(
    images: torch.Tensor,
    columns: Sequence[torch.Tensor],
    titles: Sequence[str],
    row_labels: Sequence[str],
    kinds: Optional[Sequence[str]] = None,
    title: str = "",
):
    """Rows of samples: the image, then one panel per column (``kind`` "map": a zero-centred overlay,
    symmetric by the row's max ``|value|`` over the map columns; "image": an image as is)."""
    from matplotlib import pyplot as plt

    kinds = list(kinds or ["map"] * len(columns))
    rows = images.shape[0]
    fig, axes = plt.subplots(
        rows,
        len(columns) + 1,
        figsize=(1.9 * (len(columns) + 1), 1.9 * rows + 0.6),
        squeeze=False,
        layout="constrained",
        dpi=plots.DPI,
    )
    for r in range(rows):
        axes[r, 0].imshow(plots.image_hwc(images[r]), cmap="gray", vmin=0, vmax=1)
        plots.clean(axes[r, 0])
        axes[r, 0].set_ylabel(row_labels[r], fontsize=8)
        maps = [c[r] for c, k in zip(columns, kinds) if k == "map"]
        vmax = plots.symmetric_limit(torch.stack(maps)) if maps else None
        for j, (column, kind) in enumerate(zip(columns, kinds), start=1):
            if kind == "map":
                plots.overlay(axes[r, j], images[r], column[r], vmax=vmax)
            else:
                axes[r, j].imshow(plots.image_hwc(column[r]), cmap="gray", vmin=0, vmax=1)
                plots.clean(axes[r, j])
    for j, t in enumerate(["image", *titles]):
        axes[0, j].set_title(t, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


EXAMPLE_DPI = 72  # example grids hold photos: a low resolution keeps the committed files small


def save_figure(fig, path: Path, dpi: int = plots.DPI) -> None:
    """Save a matplotlib figure to ``path`` at ``dpi`` (the format from the suffix); a pyplot figure is closed."""
    plots.save(fig, Path(path), dpi=dpi)
