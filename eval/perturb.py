r"""`backprop-hooks perturb`: perturb inputs along an explanation and measure what the target gains.

Protocol (paper §5.1 as corrected by the review). For each sample with target class t (the ground
truth; the prediction for unlabelled photos) and each mode (target) m, ε and n_tot:

    x ← x0;  repeat n_tot times:  x ← x + (ε/n_tot)·sign(φ_m(x));  x ← clamp(x, x0−ε, x0+ε);  x ← clamp(x, 0, 1)

with φ_m(x) the explanation (default: the input gradient) of target m for class t, recomputed at every
step. Reported against the unperturbed input, averaged **per sample** over the same samples for every
mode, with 95 % confidence intervals: Δacc (top-1 correct), Δp_t (softmax probability), Δy_t (logit).

Batching: all ε values are stacked into one batch, so each step of a mode is one explanation call
(one forward + one backward) for every sample and every ε of the chunk.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks.errors import UsageError

from . import report
from .experiment import Setup, experiment_parser, execute, explain_batch, prepare, target_of
from .runner import Process, Results, config_hash

DEFAULT_MODEL = "digits_cnn"
DEFAULT_DATA = "digits"
DEFAULT_METHOD = "gradient"
DEFAULT_TARGETS = ("weighted", "logit", "mean", "max")
DEFAULT_EPS = (1e-3, 3e-3)
DEFAULT_STEPS = (1, 2, 10)
MODE_TITLES = {"logit": "original", "weighted": "weighted", "mean": "mean", "max": "max"}
METRICS = (("acc", "Δacc"), ("p", "Δp_t"), ("y", "Δy_t"))


# ---- the update --------------------------------------------------------------------------------------


def perturb_step(x: torch.Tensor, x0: torch.Tensor, phi: torch.Tensor, step: Any, eps: Any) -> torch.Tensor:
    """``clamp(clamp(x + step·sign(φ), x0 − ε, x0 + ε), 0, 1)``; ``step``/``eps`` floats or broadcastable tensors."""
    x = x + step * phi.sign()
    x = torch.clamp(x, min=x0 - eps, max=x0 + eps)
    return x.clamp(0.0, 1.0)


def explain_input(
    model: nn.Module, x: torch.Tensor, method: str, target: str, classes: torch.Tensor, **options: Any
) -> torch.Tensor:
    """φ: the input-space explanation (same shape as ``x``) of ``target`` for ``classes``, in one call."""
    phi = explain_batch(model, x, method, target, classes, **options).attributions
    if phi.shape != x.shape:
        raise UsageError(
            f"method {method!r} explains in a space of shape {tuple(phi.shape[1:])}, not the input's "
            f"{tuple(x.shape[1:])}; perturb needs an input-space method (gradient, input_x_gradient, ...)"
        )
    return phi


def perturb(
    model: nn.Module,
    x0: torch.Tensor,
    classes: torch.Tensor,
    method: str,
    target: str,
    eps: Sequence[float],
    steps: int,
    **options: Any,
) -> torch.Tensor:
    """Perturbed inputs (E, B, ...) for every ε: ``steps`` updates of size ε/steps along sign(φ)."""
    e, b = len(eps), x0.shape[0]
    origin = x0.repeat(e, *([1] * (x0.dim() - 1)))  # ε-major: rows i·B .. (i+1)·B − 1 have ε_i
    radius = torch.tensor(list(eps), dtype=x0.dtype, device=x0.device).repeat_interleave(b)
    radius = radius.view(-1, *([1] * (x0.dim() - 1)))
    x, repeated = origin, classes.repeat(e)
    for _ in range(steps):
        phi = explain_input(model, x, method, target, repeated, **options)
        x = perturb_step(x, origin, phi, radius / steps, radius)
    return x.view(e, b, *x0.shape[1:])


def outcome(logits: torch.Tensor, classes: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per sample: top-1 correct (0/1), p_t and y_t; ``logits`` (..., B, C), ``classes`` (B,)."""
    index = classes.expand(logits.shape[:-1]).unsqueeze(-1)
    return {
        "acc": (logits.argmax(dim=-1) == index.squeeze(-1)).to(logits.dtype),
        "p": logits.softmax(dim=-1).gather(-1, index).squeeze(-1),
        "y": logits.gather(-1, index).squeeze(-1),
    }


def perturbation_process(
    model: nn.Module, method: str, targets: Sequence[str], eps: Sequence[float], steps: Sequence[int], **options: Any
) -> Process:
    """The per-batch job: base outcome (B,) and outcomes after perturbation (T, E, S, B)."""

    def process(x: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> Results:
        logits0, t = target_of(model, x, labels)
        base = outcome(logits0, t)
        after = {k: x.new_empty(len(targets), len(eps), len(steps), x.shape[0]) for k in base}
        for i, target in enumerate(targets):
            for k, n in enumerate(steps):
                xe = perturb(model, x, t, method, target, eps, n, **options)
                with torch.no_grad():
                    logits = model(xe.flatten(0, 1)).view(len(eps), x.shape[0], -1)
                for key, value in outcome(logits, t).items():
                    after[key][i, :, k] = value
        return {"label": labels, "t": t, **{f"base_{k}": v for k, v in base.items()}, **after}

    return process


# ---- summary and report ------------------------------------------------------------------------------


def summarize(
    results: Results, targets: Sequence[str], eps: Sequence[float], steps: Sequence[int]
) -> List[Dict[str, Any]]:
    """One row per (mode, ε, n_tot): per-sample means and 95 % CIs of the base values and the deltas."""
    n = int(results["base_acc"].numel())
    base = {k: report.mean_ci(results[f"base_{k}"]) for k, _ in METRICS}
    rows = []
    for i, target in enumerate(targets):
        for j, e in enumerate(eps):
            for k, s in enumerate(steps):
                row: Dict[str, Any] = {"mode": target, "eps": float(e), "steps": int(s), "n": n}
                for key, _ in METRICS:
                    row[f"base_{key}"] = base[key][0]
                for key, _ in METRICS:
                    delta = results[key][i, j, k] - results[f"base_{key}"]
                    row[f"delta_{key}"], row[f"delta_{key}_ci95"] = report.mean_ci(delta)
                rows.append(row)
    return rows


def paired(
    results: Results, targets: Sequence[str], eps: Sequence[float], steps: Sequence[int], reference: str = "logit"
) -> List[Dict[str, Any]]:
    """Per-sample paired differences of each mode against ``reference`` (the original): the mean of
    ``value_mode − value_reference`` over samples and its 95 % CI (tighter than comparing two CIs)."""
    if reference not in targets:
        return []
    r = list(targets).index(reference)
    rows = []
    for i, target in enumerate(targets):
        if i == r:
            continue
        for j, e in enumerate(eps):
            for k, s in enumerate(steps):
                row: Dict[str, Any] = {"mode": target, "versus": reference, "eps": float(e), "steps": int(s)}
                for key, _ in METRICS:
                    diff = results[key][i, j, k] - results[key][r, j, k]
                    row[f"diff_{key}"], row[f"diff_{key}_ci95"] = report.mean_ci(diff)
                rows.append(row)
    return rows


def paired_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The Markdown table of each target's paired difference to the original (logit) explanation, ± its 95 % CI."""

    def cell(r, key):
        digits = 2 if key == "y" else 4
        return f"{report.fmt(r[f'diff_{key}'], digits)} ± {report.fmt(r[f'diff_{key}_ci95'], digits)}"

    return report.markdown_table(
        ["mode − original", "ε", "n_tot", "Δacc diff ± CI95", "Δp_t diff ± CI95", "Δy_t diff ± CI95"],
        [
            [
                MODE_TITLES.get(r["mode"], r["mode"]),
                f"{r['eps']:g}",
                r["steps"],
                cell(r, "acc"),
                cell(r, "p"),
                cell(r, "y"),
            ]
            for r in rows
        ],
    )


def review_table(rows: Sequence[Dict[str, Any]], targets: Sequence[str]) -> str:
    """The review's layout: a line per (ε, n_tot); base acc / p_t / y_t; each Δ for every mode."""
    modes = "/".join(MODE_TITLES.get(t, t) for t in targets)
    headers = ["ε", "n_tot", "n", "base acc / p_t / y_t"] + [f"{title} {modes}" for _, title in METRICS]
    by_key = {(r["mode"], r["eps"], r["steps"]): r for r in rows}
    lines = []
    for e, s in dict.fromkeys((r["eps"], r["steps"]) for r in rows):
        first = by_key[(targets[0], e, s)]
        base = f"{first['base_acc']:.3f}/{first['base_p']:.3f}/{first['base_y']:.2f}"
        cells = [
            "/".join(report.fmt(by_key[(t, e, s)][f"delta_{key}"], 2 if key == "y" else 3) for t in targets)
            for key, _ in METRICS
        ]
        lines.append([f"{e:g}", s, first["n"], base, *cells])
    return report.markdown_table(headers, lines)


def ci_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Every row with its 95 % confidence intervals."""

    def cell(r, key):
        digits = 2 if key == "y" else 3
        return f"{report.fmt(r[f'delta_{key}'], digits)} ± {report.fmt(r[f'delta_{key}_ci95'], digits)}"

    return report.markdown_table(
        ["mode", "ε", "n_tot", "n", "Δacc ± CI95", "Δp_t ± CI95", "Δy_t ± CI95"],
        [
            [
                MODE_TITLES.get(r["mode"], r["mode"]),
                f"{r['eps']:g}",
                r["steps"],
                r["n"],
                cell(r, "acc"),
                cell(r, "p"),
                cell(r, "y"),
            ]
            for r in rows
        ],
    )


def sample_rows(setup: Setup, results: Results, targets, eps, steps) -> List[Dict[str, Any]]:
    """Per-sample results: base values and, per (mode, ε, n_tot), the values after perturbation."""
    rows = []
    for s in range(results["position"].numel()):
        row = setup.sample_row(results, s, t="t")
        row.update({f"base_{k}": float(results[f"base_{k}"][s]) for k, _ in METRICS})
        for i, target in enumerate(targets):
            for j, e in enumerate(eps):
                for k, n in enumerate(steps):
                    for key, _ in METRICS:
                        row[f"{target}_e{e:g}_n{n}_{key}"] = float(results[key][i, j, k, s])
        rows.append(row)
    return rows


def figure(
    rows: Sequence[Dict[str, Any]], targets: Sequence[str], eps: Sequence[float], steps: Sequence[int], title: str
):
    """The paper's Figure 3: per ε a row of bar charts (Δy_t, Δp_t, Δacc) with bars per mode across n_tot."""
    from matplotlib import pyplot as plt

    by_key = {(r["mode"], r["eps"], r["steps"]): r for r in rows}
    fig, axes = plt.subplots(len(eps), 3, figsize=(12, 3.2 * len(eps)), squeeze=False, layout="constrained")
    for j, e in enumerate(eps):
        for col, (key, label) in enumerate([("y", "Δy_t"), ("p", "Δp_t"), ("acc", "Δacc")]):
            series = {
                MODE_TITLES.get(t, t): (
                    [by_key[(t, float(e), int(s))][f"delta_{key}"] for s in steps],
                    [by_key[(t, float(e), int(s))][f"delta_{key}_ci95"] for s in steps],
                )
                for t in targets
            }
            report.grouped_bars(axes[j, col], [f"n={s}" for s in steps], series, label, f"{label}, ε = {e:g}")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def example_maps(setup: Setup, method: str, targets: Sequence[str], count: int, options: Dict[str, Any]):
    """A grid: the first ``count`` samples, and per mode the explanation map φ of class t at x0."""
    count = min(count, len(setup.positions))
    items = [setup.samples.dataset[setup.positions[p]] for p in range(count)]
    x = torch.stack([img for img, _ in items]).to(setup.device)
    labels = torch.tensor([int(lbl) for _, lbl in items], device=setup.device)
    logits, t = target_of(setup.model, x, labels)
    columns = [explain_input(setup.model, x, method, target, t, **options).sum(dim=1) for target in targets]
    names = setup.class_names
    row_labels = [
        f"{setup.sample_name(p)}\nt = {names[c]} ({c}), p = {q:.2f}"[:60]
        for p, c, q in zip(range(count), t.tolist(), logits.softmax(1).gather(1, t[:, None])[:, 0].tolist())
    ]
    return report.example_grid(
        x.cpu(),
        [c.cpu() for c in columns],
        [f"{MODE_TITLES.get(m, m)}" for m in targets],
        row_labels,
        title=f"{method} maps of class t (red for, blue against)",
    )


def write_report(setup: Setup, results: Results, out: Path) -> str:
    """results.md (review layout + CIs), results.csv, results.json (config, rows), samples.csv, figures.
    Returns the headline: the sample count and the review's table."""
    cfg = setup.config
    targets, eps, steps = cfg["targets"], cfg["eps"], cfg["steps"]
    rows = summarize(results, targets, eps, steps)
    truth = (
        "ground-truth label"
        if cfg["labelled"]
        else "the model's prediction on the unperturbed image "
        "(photos have no ground truth: base accuracy is 1 by construction)"
    )
    md = [
        f"# Perturbation: {cfg['model']} on {cfg['data']}",
        "",
        f"Method `{cfg['method']}`; modes {', '.join(targets)}; t = {truth}; n = {rows[0]['n']} samples "
        f"(per-sample means, 95 % CIs by Student t). Weights sha256 `{cfg['weights_sha256'][:16]}…`; "
        f"config hash `{config_hash(cfg)[:16]}…`.",
        "",
        review_table(rows, targets),
        "",
        "## With 95 % confidence intervals",
        "",
        ci_table(rows),
        "",
    ]
    pairs = paired(results, targets, eps, steps)
    if pairs:
        md += ["## Paired per-sample differences against the original (logit) mode", "", paired_table(pairs), ""]
    report.write_text(out / "results.md", "\n".join(md))
    report.write_csv(out / "results.csv", rows)
    report.write_json(
        out / "results.json", {"config": cfg, "rows": rows, "paired": pairs, "samples_file": "samples.csv"}
    )
    report.write_csv(out / "samples.csv", sample_rows(setup, results, targets, eps, steps))
    report.save_figure(
        figure(rows, targets, eps, steps, f"{cfg['model']} on {cfg['data']}, {cfg['method']}, n = {rows[0]['n']}"),
        out / "figure_deltas.png",
    )
    if setup.examples > 0:
        report.save_figure(
            example_maps(setup, cfg["method"], targets, setup.examples, cfg["options"]),
            out / "example_maps.png",
            dpi=report.EXAMPLE_DPI,
        )
    return f"{cfg['model']} on {cfg['data']}, {cfg['method']}: n = {rows[0]['n']} samples\n" + review_table(
        rows, targets
    )


# ---- command line ------------------------------------------------------------------------------------


def canonical_targets(targets: Sequence[str]) -> List[str]:
    """Target names as given (``versus:S`` allowed), validated, without repeats."""
    out = []
    for t in targets:
        key = bh.targets.get(t).key
        if key not in out:
            out.append(key)
    return out


HELP = "perturbation experiment: Δacc, Δp_t, Δy_t along explanations (paper §5.1)"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``perturb`` subcommand; its ``func`` default is :func:`run`."""
    parser = experiment_parser(subparsers, "perturb", HELP, __doc__, DEFAULT_MODEL, DEFAULT_DATA)
    parser.add_argument(
        "--method", default=DEFAULT_METHOD, help="input-space method: gradient, input_x_gradient, smoothgrad, ..."
    )
    parser.add_argument("--eps", nargs="+", type=float, default=list(DEFAULT_EPS), help="L∞ radii ε")
    parser.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS), help="numbers of steps n_tot")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=list(DEFAULT_TARGETS),
        help="modes: " + ", ".join(bh.targets.names()) + ", versus:S",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``backprop-hooks perturb``; returns the exit code."""
    targets = canonical_targets(args.targets)
    bh.methods.get(args.method)
    if any(not e > 0 for e in args.eps):
        raise UsageError(f"--eps must be > 0, got {args.eps}")
    if any(s < 1 for s in args.steps):
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    eps, steps = list(dict.fromkeys(args.eps)), list(dict.fromkeys(args.steps))
    params = {"method": args.method, "targets": targets, "eps": eps, "steps": steps, "options": {}}
    setup = prepare(args, "perturb", params)
    first, _ = setup.samples.dataset[setup.positions[0]]
    explain_input(
        setup.model,
        first[None].to(setup.device),
        args.method,
        "logit",
        torch.zeros(1, dtype=torch.long, device=setup.device),
    )  # input-space check, before the run
    process = perturbation_process(setup.model, args.method, targets, eps, steps)
    return execute(setup, args, process, write_report, desc="perturb")
