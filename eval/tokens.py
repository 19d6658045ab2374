"""Token heat-maps, the text counterpart of the image overlays of :mod:`backprop_hooks.eval.plots`: the same
signed colour scale (``bwr``: red for evidence for the explained class or contrast, blue against, white zero,
symmetric by the largest absolute score of each sequence).

* :func:`html` / :func:`save_html`: a self-contained HTML page (inline styles, no script, no external file),
  each token's score in its tooltip;
* :func:`terminal`: the same colours as ANSI 24-bit backgrounds (``color=False``: ``token(+0.42)``);
* :func:`save_png`: the same as an image (matplotlib, monospaced tokens on their colours), for documents.

Padded positions (``attention_mask == 0``) are not shown.
"""

from __future__ import annotations

import html as _html
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

Row = Tuple[Sequence[str], Sequence[float], str]  # tokens, scores, caption


def _bwr(v: float) -> Tuple[int, int, int]:
    """``v`` in [-1, 1] -> the ``bwr`` colour: blue (-1), white (0), red (+1)."""
    v = max(-1.0, min(1.0, v))
    fade = int(round(255 * (1 - abs(v))))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def _scaled(scores: Sequence[float]) -> List[float]:
    m = max((abs(float(s)) for s in scores), default=0.0)
    return [float(s) / m if m > 0 else 0.0 for s in scores]


def rows(explanation, tokens: Sequence[Sequence[str]], class_names: Optional[Sequence[str]] = None) -> List[Row]:
    """One row per sequence of a text :class:`~backprop_hooks.Explanation` (from ``bh.explain_text``): its real
    tokens (``tokens[i]``, as many as the mask's ones), their scores and a caption naming class and target."""
    scores = explanation.attributions.detach().double().cpu()
    mask = explanation.extras.get("attention_mask")
    mask = torch.ones(scores.shape, dtype=torch.long) if mask is None else mask.cpu()
    out = []
    for i, toks in enumerate(tokens):
        keep = [j for j in range(scores.shape[1]) if mask[i, j]]
        if len(keep) != len(toks):
            raise ValueError(f"sequence {i} has {len(keep)} real tokens but {len(toks)} token strings were given")
        c = int(explanation.classes[i])
        name = class_names[c] if class_names is not None else str(c)
        caption = f"{name} · {explanation.target} · {explanation.method}"
        out.append((list(toks), [float(scores[i, j]) for j in keep], caption))
    return out


def terminal(tokens: Sequence[str], scores: Sequence[float], color: bool = True) -> str:
    """One line: each token on its colour (ANSI 24-bit background), or ``token(+0.42)`` without colour."""
    if not color:
        return " ".join(f"{t}({s:+.3g})" for t, s in zip(tokens, scores))
    parts = []
    for t, v in zip(tokens, _scaled(scores)):
        r, g, b = _bwr(v)
        parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m {t} \x1b[0m")
    return "".join(parts)


def html(rows_: Sequence[Row], title: str = "Token attributions") -> str:
    """A self-contained HTML page: one paragraph per row, tokens on their colours, scores in tooltips."""
    body = []
    for tokens, scores, caption in rows_:
        spans = []
        for t, s, v in zip(tokens, scores, _scaled(scores)):
            r, g, b = _bwr(v)
            spans.append(
                f'<span title="{s:+.4g}" style="background:rgb({r},{g},{b});padding:2px 3px;margin:1px;'
                f'border-radius:3px;display:inline-block">{_html.escape(t)}</span>'
            )
        body.append(f'<div class="row"><div class="cap">{_html.escape(caption)}</div>{"".join(spans)}</div>')
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{_html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".row{margin:1.2em 0;line-height:2}.cap{color:#555;font-size:90%}"
        "</style></head><body>"
        f"<h2>{_html.escape(title)}</h2>"
        "<p>red: evidence for the class (or for it and not the others), blue: against; scaled per sentence "
        "by its largest |score|; hover a token for its score.</p>" + "".join(body) + "</body></html>\n"
    )


def save_html(path, rows_: Sequence[Row], title: str = "Token attributions") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html(rows_, title), encoding="utf-8")
    return path


def save_png(path, rows_: Sequence[Row], title: str = "", width: int = 120, dpi: int = 120) -> Path:
    """The rows as a PNG image: each caption, then its tokens on their colours with each score beneath,
    wrapped at ``width`` characters (monospaced)."""
    from matplotlib import pyplot as plt

    from backprop_hooks.files import atomic_write

    items: List[Tuple[str, object]] = []  # ("caption", text) or ("tokens", [(token, score, scaled, column)])
    for tokens, scores, caption in rows_:
        items.append(("caption", caption))
        line: List[Tuple[str, float, float, int]] = []
        column = 0
        for t, s, v in zip(tokens, scores, _scaled(scores)):
            cells = max(len(t), len(f"{s:+.2f}")) + 1
            if line and column + cells > width:
                items.append(("tokens", line))
                line, column = [], 0
            line.append((t, float(s), v, column))
            column += cells
        items.append(("tokens", line))
    heights = [0.28 if kind == "caption" else 0.5 for kind, _ in items]
    top = 0.4 if title else 0.1
    total = sum(heights) + top + 0.1
    fig = plt.figure(figsize=(0.078 * width + 0.3, total), dpi=dpi)
    if title:
        fig.text(0.01, 1 - 0.22 / total, title, fontsize=10, weight="bold", va="center")
    y = 1 - top / total
    for (kind, content), h in zip(items, heights):
        centre = y - 0.5 * h / total
        if kind == "caption":
            fig.text(0.01, centre, content, fontsize=8, color="#555555", va="center")
        else:
            for t, score, v, column in content:
                x = 0.01 + column / (width + 3)
                r, g, b = _bwr(v)
                box = dict(boxstyle="round,pad=0.15", facecolor=(r / 255, g / 255, b / 255), edgecolor="none")
                fig.text(x, centre + 0.1 / total, t, fontsize=9, family="monospace", va="center", bbox=box)
                fig.text(x, centre - 0.15 / total, f"{score:+.2f}", fontsize=6, color="#666666", va="center")
        y -= h / total
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)
    return path
