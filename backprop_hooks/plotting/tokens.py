"""Token heat-maps, the text counterpart of the image overlays of :mod:`backprop_hooks.plotting.maps`: the same
signed colour scale (``bwr``: red for evidence for the explained class or contrast, blue against, white zero),
symmetric by a limit of each sequence's own (``scale=``):

* ``"robust"`` (the default): the largest ``|score|``, unless a few tokens dominate: when the ``j``-th largest
  ``|score|`` exceeds 3 × the next one (the largest such ``j ≤ max(1, n/10)`` of ``n`` tokens), the limit is that
  next one, and the ``j`` tokens above it are drawn at full colour and outlined (their scores are in the
  tooltips). One token at 13.3 and the rest at ≤ 0.66 would otherwise leave every other token white;
* ``"max"``: the largest ``|score|``, nothing clipped.

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

#: One row of a token heat-map: its tokens, their scores and a caption.
Row = Tuple[Sequence[str], Sequence[float], str]
Tokens = Union[Sequence[Sequence[str]], Callable[[List[int]], Sequence[str]], None]
SCALES = ("robust", "max")
DOMINANT = 3.0  # a token whose |score| exceeds the next one's this many times is clipped by the robust scale
LEGEND = "red: evidence for the class (or for it and not the others), blue: against; "
SCALE_LEGENDS = {
    "robust": "scaled per sentence by its largest |score|, but tokens that dominate (over 3 × the next) are "
    "clipped and outlined",
    "max": "scaled per sentence by its largest |score|",
}


def legend(scale: str = "robust") -> str:
    """What the colours mean and which scale is drawn (one line)."""
    return LEGEND + SCALE_LEGENDS[_check(scale)]


def _check(scale: str) -> str:
    if scale not in SCALES:
        from ..errors import OptionError, choices

        raise OptionError(f"unknown scale {scale!r} for token heat-maps; accepted: {choices(SCALES)}")
    return scale


def limit(scores: Sequence[float], scale: str = "robust") -> Tuple[float, int]:
    """``(m, j)``: the half-range of a sequence's colours and how many tokens lie beyond it (see the module
    docstring); ``m`` is 0 for a sequence without a non-zero score."""
    top = sorted((abs(float(s)) for s in scores), reverse=True)
    if not top or top[0] == 0:
        return 0.0, 0
    if _check(scale) == "robust":
        for j in range(min(max(1, len(top) // 10), len(top) - 1), 0, -1):
            if top[j] > 0 and top[j - 1] > DOMINANT * top[j]:  # the j largest stand far above the rest
                return top[j], j
    return top[0], 0


def _bwr(v: float) -> Tuple[int, int, int]:
    """``v`` in [-1, 1] -> the ``bwr`` colour: blue (-1), white (0), red (+1)."""
    v = max(-1.0, min(1.0, v))
    fade = int(round(255 * (1 - abs(v))))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def _scaled(scores: Sequence[float], scale: str = "robust") -> Tuple[List[float], List[bool], str]:
    """Each score divided by the sequence's limit and clipped to [-1, 1], whether it was clipped, and a note
    for the caption when some were (``"scale ±0.66: 1 token beyond it, outlined"``)."""
    m, beyond = limit(scores, scale)
    values = [max(-1.0, min(1.0, float(s) / m)) if m > 0 else 0.0 for s in scores]
    clipped = [m > 0 and abs(float(s)) > m * (1 + 1e-9) for s in scores]
    note = f"scale ±{m:.3g}: {beyond} token{'s' * (beyond > 1)} beyond it, outlined" if beyond else ""
    return values, clipped, note


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
    caption naming the objective (the class and target, a ``Versus`` target's other class), the class's
    probability and the method: ``"string (1), weighted contrast · p = 0.87 · attnlrp"``. ``class_names``:
    default the explanation's (``e.named``, or the model's own: a Hugging Face config's ``id2label``)."""
    from .labels import what

    scores = explanation.attributions.detach().double().cpu()
    mask = explanation.extras.get("attention_mask")
    mask = torch.ones(scores.shape, dtype=torch.long) if mask is None else mask.cpu()
    if tokens is None or callable(tokens):
        tokens = token_strings(explanation, tokens)
    if class_names is None:
        class_names = explanation.extras.get("class_names")
    probabilities = explanation.probabilities.detach().double().cpu()
    out = []
    for i, toks in enumerate(tokens):
        keep = [j for j in range(scores.shape[1]) if mask[i, j]]
        if len(keep) != len(toks):
            raise ValueError(f"sequence {i} has {len(keep)} real tokens but {len(toks)} token strings were given")
        p = float(probabilities[i, int(explanation.classes[i])])
        caption = f"{what(explanation, i, class_names)} · p = {p:.3g} · {explanation.method}"
        out.append((list(toks), [float(scores[i, j]) for j in keep], caption))
    return out


def terminal(tokens: Sequence[str], scores: Sequence[float], color: bool = True, scale: str = "robust") -> str:
    """One line: each token on its colour (ANSI 24-bit background; a clipped token underlined, with its
    score), or ``token(+0.42)`` without colour."""
    if not color:
        return " ".join(f"{t}({s:+.3g})" for t, s in zip(tokens, scores))
    parts = []
    values, clipped, _ = _scaled(scores, scale)
    for t, s, v, beyond in zip(tokens, scores, values, clipped):
        r, g, b = _bwr(v)
        text = f"\x1b[4m{t}({s:+.3g})\x1b[24m" if beyond else t
        parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m {text} \x1b[0m")
    return "".join(parts)


def _row_html(tokens: Sequence[str], scores: Sequence[float], caption: str, scale: str) -> str:
    spans = []
    values, clipped, note = _scaled(scores, scale)
    for t, s, v, beyond in zip(tokens, scores, values, clipped):
        r, g, b = _bwr(v)
        mark = "outline:2px solid #000;" if beyond else ""
        spans.append(
            f'<span title="{s:+.4g}{" (beyond the scale)" if beyond else ""}" style="background:rgb({r},{g},{b});'
            f'{mark}padding:2px 3px;margin:1px;border-radius:3px;display:inline-block">{_html.escape(t)}</span>'
        )
    caption = f"{caption} · {note}" if note else caption
    return f'<div class="row"><div class="cap">{_html.escape(caption)}</div>{"".join(spans)}</div>'


def fragment(rows_: Sequence[Row], scale: str = "robust") -> str:
    """The rows as an HTML ``<div>`` with inline styles (a notebook's view of a text explanation)."""
    body = "".join(
        _row_html(tokens, scores, caption, scale).replace('class="cap"', 'style="color:#555;font-size:90%"')
        for tokens, scores, caption in rows_
    )
    note = _html.escape(legend(scale))
    return f'<div style="line-height:2">{body}<div style="color:#555;font-size:80%">{note}</div></div>'


def html(rows_: Sequence[Row], title: str = "Token attributions", scale: str = "robust") -> str:
    """A self-contained HTML page: one paragraph per row, tokens on their colours, scores in tooltips."""
    body = [_row_html(tokens, scores, caption, scale) for tokens, scores, caption in rows_]
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{_html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".row{margin:1.2em 0;line-height:2}.cap{color:#555;font-size:90%}"
        "</style></head><body>"
        f"<h2>{_html.escape(title)}</h2>"
        f"<p>{_html.escape(legend(scale))}; hover a token for its score.</p>" + "".join(body) + "</body></html>\n"
    )


def save_html(path, rows_: Sequence[Row], title: str = "Token attributions", scale: str = "robust") -> Path:
    """Write :func:`html` of the rows to ``path`` (folders made as needed) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html(rows_, title, scale), encoding="utf-8")
    return path


def figure(
    rows_: Sequence[Row], width: float = 8.0, fontsize: float = 10.0, dpi: int = 100, scale: str = "robust"
) -> Figure:
    """The rows as a figure: each caption, then its tokens on their colours (a clipped token outlined),
    wrapped at ``width`` inches; a colour bar (-1 to 1: each sequence's scores divided by its limit) at the
    bottom, saying which scale is drawn."""
    from .maps import colorbar, new_figure

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = new_figure(figsize=(width, 1.0), dpi=dpi)
    renderer = FigureCanvasAgg(fig).get_renderer()  # to measure the tokens' widths
    margin, gap, line = 0.15, 0.04, fontsize / 72 * 1.9  # inches
    placed, y = [], margin
    for tokens, scores, caption in rows_:
        values, clipped, note = _scaled(scores, scale)
        placed.append((margin, y, f"{caption} · {note}" if note else caption, None, False))
        y += line * 0.8
        x = margin
        for token, v, beyond in zip(tokens, values, clipped):
            probe = fig.text(0, 0, token, fontsize=fontsize)
            w = probe.get_window_extent(renderer).width / dpi + 0.1
            probe.remove()
            if x + w > width - margin and x > margin:
                x, y = margin, y + line
            placed.append((x, y, token, _bwr(v), beyond))
            x += w + gap
        y += line * 1.3
    height = y + 0.85  # room for the colour bar
    fig.set_size_inches(width, height)
    for x, top, text, rgb, beyond in placed:
        kwargs = dict(fontsize=fontsize, va="top", transform=fig.dpi_scale_trans)
        if rgb is None:
            fig.text(x, height - top, text, color="#555555", **{**kwargs, "fontsize": fontsize * 0.85})
        else:
            edge = dict(edgecolor="black", linewidth=1.5) if beyond else dict(edgecolor="none")
            box = dict(boxstyle="round,pad=0.2", facecolor=[c / 255 for c in rgb], **edge)
            ink = "white" if min(rgb) < 110 else "black"  # dark backgrounds get white letters
            fig.text(x + 0.05, height - top, text, bbox=box, color=ink, **kwargs)
    cax = fig.add_axes((0.25, 0.45 / height, 0.5, 0.12 / height))
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = ScalarMappable(Normalize(-1.0, 1.0), "bwr")
    which = "÷ its largest |score|" if scale == "max" else "÷ its largest |score|; dominant tokens clipped, outlined"
    colorbar(fig, bar, f"red: for t, blue: against t (each sequence {which})", cax=cax)
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
