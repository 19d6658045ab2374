"""Token heat-maps, the text counterpart of the image overlays of :mod:`backprop_hooks.plotting.maps`: the same
signed colour scale (``bwr``: red for evidence for the explained class or contrast, blue against, white zero,
symmetric by the largest absolute score of each sequence).

* :func:`rows`: the rows (tokens, scores, caption) of a text :class:`~backprop_hooks.Explanation`;
* :func:`html` / :func:`save_html`: a self-contained HTML page (inline styles, no script, no external file),
  each token's score in its tooltip; :func:`fragment`: the same without the page, for a notebook;
* :func:`terminal`: the same colours as ANSI 24-bit backgrounds (``color=False``: ``token(+0.42)``);
* :func:`figure`: a matplotlib figure of the rows with a colour bar (PNG in notebooks and README figures);
* :func:`readable`: a tokenizer's tokens as people read them (byte-level BPE's ``Ġ`` as a space).

Padded positions (``attention_mask == 0``) are not shown.
"""

from __future__ import annotations

import html as _html
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple, Union

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Row = Tuple[Sequence[str], Sequence[float], str]  # tokens, scores, caption
Tokens = Union[Sequence[Sequence[str]], Callable[[List[int]], Sequence[str]], None]
LEGEND = (
    "red: evidence for the class (or for it and not the others), blue: against; scaled per sentence by its "
    "largest |score|"
)


def _bwr(v: float) -> Tuple[int, int, int]:
    """``v`` in [-1, 1] -> the ``bwr`` colour: blue (-1), white (0), red (+1)."""
    v = max(-1.0, min(1.0, v))
    fade = int(round(255 * (1 - abs(v))))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def _scaled(scores: Sequence[float]) -> List[float]:
    m = max((abs(float(s)) for s in scores), default=0.0)
    return [float(s) / m if m > 0 else 0.0 for s in scores]


def token_strings(explanation, tokens: Tokens = None) -> List[List[str]]:
    """The real tokens of each sequence of a text explanation: ``tokens`` as given (one list per sequence), a
    function of a sequence's ids (a Hugging Face tokenizer's ``convert_ids_to_tokens``), or the ids as text."""
    if tokens is not None and not callable(tokens):
        return [list(t) for t in tokens]
    ids = explanation.extras["input_ids"].detach().cpu()
    mask = explanation.extras.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.detach().cpu()
    real = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
    return [list(tokens(r)) if tokens is not None else [str(i) for i in r] for r in real]


def rows(explanation, tokens: Tokens, class_names: Optional[Sequence[str]] = None) -> List[Row]:
    """One row per sequence of a text :class:`~backprop_hooks.Explanation` (from ``bh.explain_text``): its real
    tokens (``tokens[i]``, as many as the mask's ones; or see :func:`token_strings`), their scores and a
    caption naming class and target."""
    scores = explanation.attributions.detach().double().cpu()
    mask = explanation.extras.get("attention_mask")
    mask = torch.ones(scores.shape, dtype=torch.long) if mask is None else mask.cpu()
    if tokens is None or callable(tokens):
        tokens = token_strings(explanation, tokens)
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


def _row_html(tokens: Sequence[str], scores: Sequence[float], caption: str) -> str:
    spans = []
    for t, s, v in zip(tokens, scores, _scaled(scores)):
        r, g, b = _bwr(v)
        spans.append(
            f'<span title="{s:+.4g}" style="background:rgb({r},{g},{b});padding:2px 3px;margin:1px;'
            f'border-radius:3px;display:inline-block">{_html.escape(t)}</span>'
        )
    return f'<div class="row"><div class="cap">{_html.escape(caption)}</div>{"".join(spans)}</div>'


def fragment(rows_: Sequence[Row]) -> str:
    """The rows as an HTML ``<div>`` with inline styles (a notebook's view of a text explanation)."""
    body = "".join(
        _row_html(tokens, scores, caption).replace('class="cap"', 'style="color:#555;font-size:90%"')
        for tokens, scores, caption in rows_
    )
    return f'<div style="line-height:2">{body}<div style="color:#555;font-size:80%">{_html.escape(LEGEND)}</div></div>'


def html(rows_: Sequence[Row], title: str = "Token attributions") -> str:
    """A self-contained HTML page: one paragraph per row, tokens on their colours, scores in tooltips."""
    body = [_row_html(tokens, scores, caption) for tokens, scores, caption in rows_]
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


def figure(rows_: Sequence[Row], width: float = 8.0, fontsize: float = 10.0, dpi: int = 100) -> Figure:
    """The rows as a figure: each caption, then its tokens on their colours, wrapped at ``width`` inches; a
    colour bar (-1 to 1: each sequence's scores divided by its largest |score|) at the bottom."""
    from .maps import colorbar, new_figure

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = new_figure(figsize=(width, 1.0), dpi=dpi)
    renderer = FigureCanvasAgg(fig).get_renderer()  # to measure the tokens' widths
    margin, gap, line = 0.15, 0.04, fontsize / 72 * 1.9  # inches
    placed, y = [], margin
    for tokens, scores, caption in rows_:
        placed.append((margin, y, caption, None))
        y += line * 0.8
        x = margin
        for token, v in zip(tokens, _scaled(scores)):
            probe = fig.text(0, 0, token, fontsize=fontsize)
            w = probe.get_window_extent(renderer).width / dpi + 0.1
            probe.remove()
            if x + w > width - margin and x > margin:
                x, y = margin, y + line
            placed.append((x, y, token, _bwr(v)))
            x += w + gap
        y += line * 1.3
    height = y + 0.75  # room for the colour bar
    fig.set_size_inches(width, height)
    for x, top, text, rgb in placed:
        kwargs = dict(fontsize=fontsize, va="top", transform=fig.dpi_scale_trans)
        if rgb is None:
            fig.text(x, height - top, text, color="#555555", **{**kwargs, "fontsize": fontsize * 0.85})
        else:
            box = dict(boxstyle="round,pad=0.2", facecolor=[c / 255 for c in rgb], edgecolor="none")
            ink = "white" if min(rgb) < 110 else "black"  # dark backgrounds get white letters
            fig.text(x + 0.05, height - top, text, bbox=box, color=ink, **kwargs)
    cax = fig.add_axes((0.25, 0.35 / height, 0.5, 0.12 / height))
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    scale = ScalarMappable(Normalize(-1.0, 1.0), "bwr")
    colorbar(fig, scale, "red: for t, blue: against t (per sequence, ÷ its largest |score|)", cax=cax)
    return fig


_INVISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥"}


def readable(tokenizer, strip: bool = True) -> Callable[[Sequence[int]], List[str]]:
    """A function of a sequence's ids that returns its tokens as people read them (for ``rows``, ``named`` and
    the plots): each token decoded alone, so byte-level BPE's ``Ġ`` is a space again, special tokens as they are;
    ``strip``: without the surrounding spaces (a token of spaces alone shows as ``␣``)."""

    def strings(ids: Sequence[int]) -> List[str]:
        out = []
        for i in ids:
            text = tokenizer.decode([int(i)])
            shown = text.strip() if strip else text
            out.append(shown or "".join(_INVISIBLE.get(c, c) for c in text) or "∅")
        return out

    return strings
