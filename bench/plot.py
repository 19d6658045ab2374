"""The scaling figure: each method's ratio to its floor vs batch size, input resolution, depth and number of
classes (``python -m bench --scaling`` writes it next to ``results.md``)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

PANELS = (  # sweep, x axis field, x label, ratio field
    ("batch", "batch", "batch size (224 px)", "x_fwd_bwd"),
    ("size", "size", "image size, px (batch 4)", "x_fwd_bwd"),
    ("depth", "depth", "layers / blocks (batch 4, 224 px)", "x_fwd_bwd"),
    ("classes", "classes", "classes (ResNet-18, batch 4)", "x_logit"),
)


def _label(row: Dict) -> str:
    model = row["model"].partition("@")[0]
    family = "ViT-Tiny" if model.startswith("vit_tiny") else "ResNet"
    if row["method"] == "capture":
        return f"{family}: capture (÷ fwd)"
    return f"{family}: {row['method']}" + (f" {row['target']}" if row.get("sweep") == "classes" else "")


def scaling_figure(rows: List[Dict], path: Path) -> Optional[Path]:
    """Draw the panels of ``PANELS`` from the sweep rows into ``path`` (PNG); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2), constrained_layout=True)
    for ax, (sweep, field, xlabel, ratio) in zip(axes, PANELS):
        lines: Dict[str, List] = {}
        for r in rows:
            if r.get("sweep") != sweep or r["method"] in ("fwd", "fwd+bwd") or r.get("impl") != "backprop_hooks":
                continue
            if sweep == "classes" and r.get("target") == "logit":
                continue
            value = r.get("x_fwd") if r["method"] == "capture" else r.get(ratio)
            if value is not None:
                lines.setdefault(_label(r), []).append((r[field], value))
        for label, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("time ÷ logit target" if ratio == "x_logit" else "time ÷ forward+backward")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(f"vs {sweep}")
        if lines:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
