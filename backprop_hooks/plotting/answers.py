"""A language model's answer drawn (``AnswerExplanation.plot`` and its notebook view): the answer-level row (the
whole answer's target over every token) above the step × token matrix (row ``j``: answer token ``j``'s target
over the tokens before it). Colours as in every plot here: ``bwr``, red for the explained answer (or for it
and not the foil), blue against, white zero, symmetric on ±the 99th percentile of ``|value|`` of each panel
(values beyond it saturate); cells a step cannot see (the token itself and after it, padding) are grey.
"""

from __future__ import annotations

import html as _html
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from .labels import TARGET_TITLES
from .tokens import _bwr

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GREY = "#dddddd"


def _limit(values: torch.Tensor, percentile: float) -> float:
    """±the ``percentile``-th percentile of ``|values|`` (the largest ``|value|`` if that is 0; 1 for all zeros)."""
    flat = values.detach().abs().flatten().double()
    if flat.numel() == 0 or not bool((flat > 0).any()):
        return 1.0
    limit = float(torch.quantile(flat[flat > 0], percentile / 100.0))
    return limit if limit > 0 else float(flat.max())


def _title(g, index: int, tokens: List[str]) -> str:
    answer = "".join(tokens[g.prompt_length :])
    what = TARGET_TITLES.get(g.target, g.target)
    p = float(g.probabilities[index][g.answer_mask[index].bool()].prod())
    title = f"{g.method}, {what} per step: why {answer!r} (p = {p:.3g})"
    if g.foil_ids is not None:
        foil = "".join(g.tokens(foil=True)[index][g.prompt_length :])
        q = float(g.foil_probabilities[index][g.foil_mask[index].bool()].prod())
        title += f" and not {foil!r} (p = {q:.3g})"
    return title


def _step_label(token: str, p: float) -> str:
    return f"→ {token!r}  p={p:.2g}"


def _visible(g, index: int, max_tokens: Optional[int]) -> Tuple[int, int]:
    """The first and last + 1 columns drawn: the real tokens, at most ``max_tokens`` of them (the last ones)."""
    real = g.attention_mask[index].nonzero().flatten()
    first, end = int(real[0]), int(real[-1]) + 1
    if max_tokens is not None and end - first > max_tokens:
        first = end - max_tokens
    return first, end


def answer_figure(
    g, index: int = 0, percentile: float = 99.0, max_tokens: Optional[int] = 80, dpi: int = 100
) -> Figure:
    """The figure of sample ``index``: the answer-level row over the step × token matrix, one colour bar each."""
    from matplotlib.colors import Normalize

    from .maps import colorbar, new_figure

    tokens = g.tokens()[index]
    first, end = _visible(g, index, max_tokens)
    columns = tokens[first:end]
    steps = int(g.answer_mask[index].sum())
    has_matrix = g.matrix is not None
    width = min(2.0 + 0.32 * len(columns), 24.0)
    height = 1.9 + (0.3 * steps + 0.4 if has_matrix else 0.0)
    fig = new_figure(figsize=(width, height), dpi=dpi, layout="constrained")
    ratios = [1.0, max(steps, 1)] if has_matrix else [1.0]
    axes = fig.subplots(len(ratios), 1, squeeze=False, gridspec_kw=dict(height_ratios=ratios))[:, 0]
    panels = [("answer", g.total[index : index + 1, first:end], g.attention_mask[index : index + 1, first:end])]
    if has_matrix:
        visible = torch.zeros(steps, g.total.shape[1], dtype=torch.bool)
        for j in range(steps):
            visible[j, : g.prompt_length + j] = g.attention_mask[index, : g.prompt_length + j].bool()
        panels.append(("steps", g.matrix[index, :steps, first:end], visible[:, first:end]))
    for ax, (name, values, shown) in zip(axes, panels):
        limit = _limit(values[shown.bool()], percentile)
        data = values.detach().double().masked_fill(~shown.bool(), float("nan")).cpu().numpy()
        artist = ax.imshow(data, cmap=_cmap(), norm=Normalize(-limit, limit), aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(columns if name == "steps" or not has_matrix else [], rotation=90, fontsize=8)
        if name == "answer":
            ax.set_yticks([0])
            ax.set_yticklabels(["whole answer"], fontsize=8)
        else:
            probs = g.probabilities[index, :steps].tolist()
            ax.set_yticks(range(steps))
            ax.set_yticklabels([_step_label(tokens[g.prompt_length + j], p) for j, p in enumerate(probs)], fontsize=8)
        colorbar(fig, artist, f"±{limit:.2g}", ax=ax, orientation="vertical", fraction=0.03, pad=0.01)
    axes[0].set_title(_title(g, index, tokens), fontsize=9)
    fig.supxlabel(
        f"red: for the answer, blue: against (each panel on ±the p{percentile:g} of |value|); "
        "grey: not seen by the step",
        fontsize=7,
        color="#555555",
    )
    return fig


def _cmap():
    from matplotlib import colormaps

    return colormaps["bwr"].with_extremes(bad=GREY)


def _cell(value: float, limit: float, shown: bool) -> str:
    if not shown:
        return f'<td style="background:{GREY}"></td>'
    r, gr, b = _bwr(value / limit)
    return f'<td title="{value:+.4g}" style="background:rgb({r},{gr},{b})"></td>'


def answer_html(g, index: int = 0, percentile: float = 99.0, max_tokens: Optional[int] = 80) -> str:
    """The same as an HTML table (a notebook's inline view): the answer row, then one row per step."""
    tokens = g.tokens()[index]
    first, end = _visible(g, index, max_tokens)
    head = "".join(
        f'<th style="writing-mode:vertical-rl;font-weight:normal">{_html.escape(t)}</th>' for t in tokens[first:end]
    )
    mask = g.attention_mask[index].bool()
    limit = _limit(g.total[index][mask], percentile)
    body = ["<tr><td><b>whole answer</b></td>"]
    body += [_cell(float(g.total[index, c]), limit, bool(mask[c])) for c in range(first, end)]
    body.append("</tr>")
    if g.matrix is not None:
        steps = int(g.answer_mask[index].sum())
        limit = _limit(g.matrix[index, :steps], percentile)
        for j in range(steps):
            label = _html.escape(_step_label(tokens[g.prompt_length + j], float(g.probabilities[index, j])))
            cells = [
                _cell(float(g.matrix[index, j, c]), limit, bool(mask[c]) and c < g.prompt_length + j)
                for c in range(first, end)
            ]
            body.append(f"<tr><td style='white-space:nowrap'>{label}</td>{''.join(cells)}</tr>")
    title = _html.escape(_title(g, index, tokens))
    return (
        f"<div><p>{title}</p><table style='border-collapse:collapse;font-size:11px'>"
        f"<tr><th></th>{head}</tr>{''.join(body)}</table>"
        "<p style='font-size:10px;color:#555'>red: for the answer, blue: against (±the 99th percentile of |value| "
        "of each part); grey: not seen by the step</p></div>"
    )


def answer_page(g, title: str = "Why this answer") -> str:
    """A self-contained HTML page (no script, no external file) with every sample's table."""
    tables = "".join(answer_html(g, i) for i in range(g.total.shape[0]))
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'><h3>{_html.escape(title)}</h3>{tables}</body></html>"
    )
