r"""Deletion check of relevance on the bundled transformers: remove the most relevant patches (the digits ViT)
or tokens (the text classifier) first, and the target's log-odds should fall faster than in a random order.

    python -m backprop_hooks.eval.deletion --model digits_vit --out eval/results/deletion_digits_vit
    python -m backprop_hooks.eval.deletion --model text_topics --out eval/results/deletion_text_topics
    python -m backprop_hooks.eval.deletion --model python_docs_lm --out eval/results/deletion_answers

The language model's answers against foil answers (``--model python_docs_lm``) are described in
:mod:`backprop_hooks.eval.answer_deletion`; the rest of this docstring is about the two classifiers.

Samples: the 450 held-out digits, or the 146 held-out sentences of the text classifier; ``t`` is the model's
prediction on the intact input. Units: the ViT's patches (a removed patch's pixels are set to 0, the digits'
background) or the real tokens but ``[CLS]`` (a removed token is masked out of the attention). Each order
ranks the units by a method's per-unit relevance (attributions summed over a patch's pixels or a token's
hidden size), most relevant first; ``random`` is the mean over several random orders per sample.

At fractions ``f`` of each sample's units removed (``round(f·K)`` units), the log-odds of ``t``,
``log(p_t/(1−p_t)) = y_t − logsumexp_{s≠t} y_s``, is measured. Reported per order: the area under the mean
curve, ``∫₀¹ logodds df`` (trapezoid over the fractions), and the **area between** the random curve and
this order's curve, ``∫₀¹ (random − order) df`` per sample (> 0: removing by relevance destroys the
evidence for ``t`` faster than chance), mean ± 95 % CI over samples.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import backprop_hooks as bh

from . import report
from .deletion_curves import Task, area_between, removal_masks

MODELS = ("digits_vit", "text_topics", "python_docs_lm")


def log_odds(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``log(p_t/(1−p_t))`` per sample: the potential of the weighted contrast."""
    return bh.targets.get("weighted").potential(logits, classes)


class DigitsViT(Task):
    """The bundled digits ViT on the held-out digits; the units removed are its 64 patches."""

    name, units_name = "digits_vit", "patches"

    def __init__(self, n: int, batch_size: int) -> None:
        from backprop_hooks import models
        from backprop_hooks.methods.tokens import token_layout

        self.model = models.create("digits_vit")
        x, _ = models.digits("test")
        self.x, self.batch_size = x[:n], batch_size
        self.grid = token_layout(self.model, self.x[:1]).grid
        self.patch = (x.shape[-2] // self.grid[0], x.shape[-1] // self.grid[1])
        with torch.no_grad():
            self.classes = self.model(self.x).argmax(1)
        self.units = torch.ones(len(self.x), self.grid[0] * self.grid[1], dtype=torch.bool)
        self.samples = len(self.x)

    def relevance(self, method, target):
        parts = []
        for start in range(0, len(self.x), self.batch_size):
            part = slice(start, start + self.batch_size)
            e = bh.explain(self.model, self.x[part], method, target, classes=self.classes[part])
            parts.append(self.to_units(e.attributions.sum(1)))
        return torch.cat(parts)

    def to_units(self, pixels: torch.Tensor) -> torch.Tensor:
        (h, w), (ph, pw) = self.grid, self.patch
        return pixels.reshape(-1, h, ph, w, pw).sum(dim=(2, 4)).reshape(-1, h * w)

    def to_pixels(self, units: torch.Tensor) -> torch.Tensor:
        (h, w), (ph, pw) = self.grid, self.patch
        grid = units.reshape(*units.shape[:-1], h, 1, w, 1).expand(*units.shape[:-1], h, ph, w, pw)
        return grid.reshape(*units.shape[:-1], 1, h * ph, w * pw)

    def curve(self, removed):
        keep = (~self.to_pixels(removed)).to(self.x.dtype)  # (F, B, 1, H, W)
        with torch.no_grad():
            x = (self.x[None] * keep).flatten(0, 1)
            logits = torch.cat([self.model(c) for c in x.split(self.batch_size * 4)])
        return log_odds(logits, self.classes.repeat(removed.shape[0])).view(removed.shape[:2])


class TextTopics(Task):
    """The bundled text classifier on its held-out sentences; the units removed are its tokens."""

    name, units_name = "text_topics", "tokens"

    def __init__(self, n: int, batch_size: int) -> None:
        from backprop_hooks.models import text_topics

        self.model, tokenizer = text_topics.load()
        _, test = text_topics.dataset()
        self.ids, self.mask = tokenizer([words for words, _ in test[:n]])
        self.batch_size = batch_size
        with torch.no_grad():
            self.classes = self.model(self.ids, attention_mask=self.mask).logits.argmax(1)
        self.units = self.mask.bool().clone()
        self.units[:, 0] = False  # [CLS], which the classifier reads, stays
        self.samples = len(self.ids)

    def relevance(self, method, target):
        e = bh.explain_text(self.model, self.ids, self.mask, method, target, self.classes)
        return e.attributions

    def curve(self, removed):
        mask = (self.mask[None] * ~removed).flatten(0, 1)
        ids = self.ids.repeat(removed.shape[0], 1)
        with torch.no_grad():
            logits = torch.cat(
                [
                    self.model(i, attention_mask=m).logits
                    for i, m in zip(ids.split(self.batch_size * 4), mask.split(self.batch_size * 4))
                ]
            )
        return log_odds(logits, self.classes.repeat(removed.shape[0])).view(removed.shape[:2])


def python_docs_lm(n: int, batch_size: int) -> Task:
    """The bundled language model's answers against foil answers
    (:class:`~backprop_hooks.eval.answer_deletion.PythonDocsLM`)."""
    from .answer_deletion import PythonDocsLM

    return PythonDocsLM(n, batch_size)


TASKS: Dict[str, Callable[[int, int], Task]] = {
    "digits_vit": DigitsViT,
    "text_topics": TextTopics,
    "python_docs_lm": python_docs_lm,
}


def run(task: Task, fractions: Sequence[float], random_orders: int, seed: int) -> Tuple[Dict, List[Dict]]:
    """Curves (F, B) for every order and the random reference; the summary rows."""
    curves: Dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)
        for method, target in task.orders:
            scores = task.relevance(method, target)
            curves[f"{method} ({target})"] = task.curve(removal_masks(scores, task.units, fractions))
    gen = torch.Generator().manual_seed(seed)
    randoms = [
        task.curve(removal_masks(torch.rand(task.units.shape, generator=gen), task.units, fractions))
        for _ in range(random_orders)
    ]
    curves["random"] = torch.stack(randoms).mean(0)
    rows = []
    f = torch.tensor(list(fractions), dtype=torch.float64)
    for name, curve in curves.items():
        auc, auc_ci = report.mean_ci(torch.trapezoid(curve.double().T, f, dim=1))
        between, between_ci = report.mean_ci(area_between(curve, curves["random"], fractions))
        rows.append(dict(order=name, auc=auc, auc_ci=auc_ci, area_between=between, area_between_ci=between_ci))
    return curves, rows


def figure(
    curves: Dict[str, torch.Tensor],
    fractions: Sequence[float],
    title: str,
    units: str,
    quantity: str = "log-odds of t",
    panels: Optional[Dict[str, List[str]]] = None,
):
    """The mean curves, the random order dashed in every panel (``panels``: title -> orders; None: one panel)."""
    from matplotlib import pyplot as plt

    panels = panels or {title: [k for k in curves if k != "random"]}
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 3.6), layout="constrained", sharey=True, squeeze=False
    )
    for ax, (name, orders) in zip(axes[0], panels.items()):
        for order in [*orders, "random"]:
            style = dict(color="gray", linestyle="--") if order == "random" else {}
            style = dict(color="black", linestyle=":") if order.startswith("recency") else style
            ax.plot(list(fractions), curves[order].double().mean(1).tolist(), label=order, **style)
        ax.set_xlabel(f"fraction of {units} removed (most relevant first)")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel(f"{quantity}, mean over samples")
    if len(panels) > 1:
        fig.suptitle(title, fontsize=10)
    return fig


def parser() -> argparse.ArgumentParser:
    """The options of ``python -m backprop_hooks.eval.deletion``."""
    p = argparse.ArgumentParser(
        prog="python -m backprop_hooks.eval.deletion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=MODELS, default="digits_vit")
    p.add_argument("--out", type=Path, default=None, help="folder for results.md/json and curves.png")
    p.add_argument("--n", type=int, default=None, help="the first N held-out samples (default: all)")
    p.add_argument("--fractions", type=int, default=21, help="number of evenly spaced fractions in [0, 1]")
    p.add_argument("--random-orders", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    return p


def main(argv=None) -> int:
    """Run the deletion check, print its table and write it to ``--out`` (results.md, .json, curves.png)."""
    a = parser().parse_args(argv)
    torch.manual_seed(a.seed)
    task = TASKS[a.model](a.n or 10**9, a.batch_size)
    fractions = [i / (a.fractions - 1) for i in range(a.fractions)]
    curves, rows = run(task, fractions, a.random_orders, a.seed)
    command = "python -m backprop_hooks.eval.deletion " + " ".join(sys.argv[1:] if argv is None else argv)
    table = report.markdown_table(
        ["order", f"area under the {task.curve_name} curve (n = {task.samples})", "area between random and this order"],
        [
            [r["order"], f"{r['auc']:.3f} ± {r['auc_ci']:.3f}", f"{r['area_between']:.3f} ± {r['area_between_ci']:.3f}"]
            for r in rows
        ],
    )
    text = (
        f"# Deletion check: {task.name}, {task.units_name} removed most relevant first\n\n"
        f"command: `{command}`\n\n{table}\n\n"
        f"Area between > 0: removing by relevance lowers the {task.quantity} faster than a random order "
        f"(mean of {a.random_orders} random orders per sample); ± is the 95 % confidence interval over samples.\n"
    )
    extra, extra_json = task.summary(curves, fractions)
    text += f"\n{extra}" if extra else ""
    print(text)
    if a.out is not None:
        report.write_text(a.out / "results.md", text)
        report.write_json(
            a.out / "results.json",
            dict(
                command=command,
                model=task.name,
                samples=task.samples,
                fractions=fractions,
                rows=rows,
                curves={k: v.double().mean(1).tolist() for k, v in curves.items()},
                versions=report.versions(),
                **extra_json,
            ),
        )
        title = f"{task.name}: deletion of {task.units_name}"
        fig = figure(curves, fractions, title, task.units_name, task.quantity, task.panels())
        report.save_figure(fig, a.out / "curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
