r"""`backprop-hooks mask`: keep only the positive (or negative) features of a map, replace the rest by a baseline.

Protocol (paper §5.2, review Table 1, with the review's equal-count bug fixed). Samples: those whose
second-highest probability p_2 exceeds ``--threshold`` (0.1); t1, t2 = the two top predicted classes.
For each sample and t ∈ {t1, t2}, each method (signed maps at input resolution; CAM methods on the
model's ``default_layer``) gives the original map φ^O (target ``logit``) and the weighted map φ^W:

* positive features: k = min(#{φ^O > 0}, #{φ^W > 0}); each map keeps its k top-ranked pixels
  (all of them positive), every other pixel becomes the baseline; negative features: the same with
  k = min(#{φ^O < 0}, #{φ^W < 0}) bottom-ranked pixels. Both maps thus change the same number of pixels.
* baselines: ``blur`` (Gaussian, kernel 101 and σ = 15 at 224 px, scaled with the image side s:
  kernel = the odd integer nearest 101·s/224, σ = 15·s/224; e.g. 15 and 2.14 at 32 px), ``zeros``,
  ``mean`` (the image's per-channel mean).
* metric: the relative probability of t, e^{y_t} / (e^{y_t1} + e^{y_t2}) on the masked image, averaged
  over samples (for t = t1 and t = t2), next to its value before masking. Higher is better when keeping
  positive features, lower when keeping negative ones.

Batching: per chunk, t1 and t2 are explained together (a 2B batch) in one call per method and target;
the masked images of both maps go through the model in one forward per baseline and feature kind.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks.errors import UsageError

from . import report
from .experiment import Setup, experiment_parser, execute, explain_batch, method_options, prepare
from .runner import Process, Results, config_hash

DEFAULT_MODEL = "digits_cnn"
DEFAULT_DATA = "digits"
DEFAULT_METHODS = ("linear_approx", "gradcam", "xgradcam")
VIT_METHODS = ("vit_gradcam", "grad_rollout")  # the defaults on vision transformers (token grids)
BASELINES = ("blur", "zeros", "mean")
FEATURES = ("positive", "negative")
DEFAULT_THRESHOLD = 0.1
MAP_TARGETS = ("logit", "weighted")  # original, weighted
CLASSES = ("t1", "t2")


# ---- the masks ---------------------------------------------------------------------------------------


def keep_top(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (B, N): the ``k[b]`` largest entries of each row of ``values`` (B, N) (ties: lower index first)."""
    order = values.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(values.shape[1], device=values.device).expand_as(order)
    )
    return ranks < k[:, None]


def equal_count_keep(
    original: torch.Tensor, weighted: torch.Tensor, features: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels each map keeps (boolean, like the (B, H, W) maps) and the common count k (B,).

    ``positive``: k = min(#positive of the two maps), each keeps its k highest pixels;
    ``negative``: k = min(#negative), each keeps its k lowest pixels. Kept pixels thus always carry the
    requested sign, and both maps keep (and replace) exactly the same number of pixels.
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    sign = 1.0 if features == "positive" else -1.0
    a, b = sign * original.flatten(1), sign * weighted.flatten(1)
    k = torch.minimum((a > 0).sum(1), (b > 0).sum(1))
    return keep_top(a, k).view_as(original), keep_top(b, k).view_as(weighted), k


def blur_parameters(size: int) -> Tuple[int, float]:
    """(kernel, σ) of the blur baseline at image side ``size``: (101, 15) at 224, scaled, kernel odd."""
    kernel = max(1, int(round(101 * size / 224)))
    kernel += 1 - kernel % 2
    kernel = min(kernel, 2 * size - 1)  # reflect padding needs kernel // 2 < size
    return kernel, 15.0 * size / 224


def baseline(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The replacement image of each sample of ``x`` (B, C, H, W): ``blur``, ``zeros`` or ``mean``."""
    if kind == "blur":
        kernel, sigma = blur_parameters(min(x.shape[-2:]))
        from torchvision.transforms import functional as TF

        return TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    raise ValueError(f"unknown baseline {kind!r}; accepted: {', '.join(BASELINES)}")


def relative_probability(logits: torch.Tensor, t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """e^{y_t} / (e^{y_t} + e^{y_other}) = sigmoid(y_t − y_other), per sample."""
    return torch.sigmoid(logits.gather(1, t[:, None]) - logits.gather(1, other[:, None]))[:, 0]


def explain_maps(
    model: nn.Module, x: torch.Tensor, method: str, target: str, classes: torch.Tensor, **options: Any
) -> torch.Tensor:
    """(B, H, W) signed maps at input resolution, one call for the whole batch."""
    maps = explain_batch(model, x, method, target, classes, **options).maps
    if maps.shape != (x.shape[0], *x.shape[-2:]):
        raise UsageError(
            f"method {method!r} gives maps of shape {tuple(maps.shape[1:])}, not the image's "
            f"{tuple(x.shape[-2:])}; choose a method with spatial maps (or a spatial --layer)"
        )
    return maps


# ---- the per-batch job -------------------------------------------------------------------------------


def masking_process(
    model: nn.Module,
    methods: Dict[str, Dict[str, Any]],
    baselines: Sequence[str],
    features: Sequence[str],
    threshold: float,
) -> Process:
    """Per sample: t1, t2, p2, kept (p2 > threshold), ``before`` (2: t1, t2), ``value`` (M, baselines,
    features, 2 maps (original, weighted), 2 classes, B) and ``k`` (M, features, 2 classes, B); NaN / −1
    for samples that are not kept."""

    def process(x: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> Results:
        b = x.shape[0]
        with torch.no_grad():
            logits = model(x)
        top = logits.softmax(dim=1).topk(2, dim=1)
        t1, t2, p2 = top.indices[:, 0], top.indices[:, 1], top.values[:, 1]
        kept = p2 > threshold
        value = x.new_full((len(methods), len(baselines), len(features), 2, 2, b), float("nan"))
        count = torch.full((len(methods), len(features), 2, b), -1, dtype=torch.long, device=x.device)
        before = torch.stack([relative_probability(logits, t1, t2), relative_probability(logits, t2, t1)])
        idx = kept.nonzero().squeeze(1)
        if idx.numel():
            n = idx.numel()
            xs = torch.cat([x[idx], x[idx]])  # t1 rows, then t2 rows
            t, other = torch.cat([t1[idx], t2[idx]]), torch.cat([t2[idx], t1[idx]])
            replacements = {kind: baseline(xs, kind) for kind in baselines}
            for m, (method, options) in enumerate(methods.items()):
                maps = [explain_maps(model, xs, method, target, t, **options) for target in MAP_TARGETS]
                for f, feature in enumerate(features):
                    keep_o, keep_w, k = equal_count_keep(maps[0], maps[1], feature)
                    count[m, f][:, idx] = k.view(2, n)
                    keep = torch.cat([keep_o, keep_w])[:, None]
                    for j, kind in enumerate(baselines):
                        masked = torch.where(keep, torch.cat([xs, xs]), torch.cat([replacements[kind]] * 2))
                        with torch.no_grad():
                            out = model(masked)
                        rel = relative_probability(out, torch.cat([t, t]), torch.cat([other, other]))
                        value[m, j, f][..., idx] = rel.view(2, 2, n)
        return {
            "label": labels,
            "t1": t1,
            "t2": t2,
            "p2": p2,
            "kept": kept.to(torch.long),
            "before": before,
            "value": value,
            "k": count,
        }

    return process


# ---- summary and report ------------------------------------------------------------------------------


def summarize(
    results: Results, methods: Sequence[str], baselines: Sequence[str], features: Sequence[str], pixels: int
) -> List[Dict[str, Any]]:
    """One row per (method, baseline, features, class): means over the kept samples, CIs, who wins."""
    kept = results["kept"].bool()
    n = int(kept.sum())
    rows = []
    for m, method in enumerate(methods):
        for j, kind in enumerate(baselines):
            for f, feature in enumerate(features):
                for c, cls in enumerate(CLASSES):
                    o, w = results["value"][m, j, f, 0, c][kept], results["value"][m, j, f, 1, c][kept]
                    better = (w > o) if feature == "positive" else (w < o)
                    row = {"method": method, "baseline": kind, "features": feature, "class": cls, "n": n}
                    row["before"], row["before_ci95"] = report.mean_ci(results["before"][c][kept])
                    row["original"], row["original_ci95"] = report.mean_ci(o)
                    row["weighted"], row["weighted_ci95"] = report.mean_ci(w)
                    row["weighted_minus_original"], row["weighted_minus_original_ci95"] = report.mean_ci(w - o)
                    row["weighted_better_fraction"] = float(better.double().mean()) if n else float("nan")
                    row["kept_pixel_fraction"] = (
                        float(results["k"][m, f, c][kept].double().mean() / pixels) if n else float("nan")
                    )
                    rows.append(row)
    return rows


def review_table(rows: Sequence[Dict[str, Any]], baselines: Sequence[str]) -> str:
    """The review's Table 1 layout: a line per (method, features, class); per baseline original / weighted.
    The better of the two is bold (higher for positive features, lower for negative)."""
    by_key = {(r["method"], r["features"], r["class"], r["baseline"]): r for r in rows}
    lines = []
    for method, feature, cls in dict.fromkeys((r["method"], r["features"], r["class"]) for r in rows):
        first = by_key[(method, feature, cls, baselines[0])]
        cells = []
        for kind in baselines:
            r = by_key[(method, feature, cls, kind)]
            o, w = report.fmt(r["original"]), report.fmt(r["weighted"])
            if r["n"] and r["original"] != r["weighted"]:
                weighted_wins = (r["weighted"] > r["original"]) == (feature == "positive")
                o, w = (o, f"**{w}**") if weighted_wins else (f"**{o}**", w)
            cells.append(f"{o} / {w}")
        lines.append([method, feature, cls, first["n"], report.fmt(first["before"]), *cells])
    return report.markdown_table(
        ["method", "features", "class", "n", "before"] + [f"{b}: O / W" for b in baselines], lines
    )


def sample_rows(setup: Setup, results: Results, methods, baselines, features) -> List[Dict[str, Any]]:
    """Per-sample results: classes, p2, whether kept, before, and every masked value and count k."""
    rows = []
    for s in range(results["position"].numel()):
        row = setup.sample_row(results, s, t1="t1", t2="t2")
        row["p2"], row["kept"] = float(results["p2"][s]), int(results["kept"][s])
        row["before_t1"], row["before_t2"] = float(results["before"][0, s]), float(results["before"][1, s])
        if row["kept"]:
            for m, method in enumerate(methods):
                for f, feature in enumerate(features):
                    for c, cls in enumerate(CLASSES):
                        row[f"{method}_{feature}_{cls}_k"] = int(results["k"][m, f, c, s])
                        for j, kind in enumerate(baselines):
                            for a, name in enumerate(("original", "weighted")):
                                row[f"{method}_{kind}_{feature}_{cls}_{name}"] = float(
                                    results["value"][m, j, f, a, c, s]
                                )
        rows.append(row)
    return rows


def figure(rows: Sequence[Dict[str, Any]], methods, baselines, features, title: str):
    """Bars: per method (columns) and features (rows), original vs weighted for each baseline and class."""
    from matplotlib import pyplot as plt

    by_key = {(r["method"], r["baseline"], r["features"], r["class"]): r for r in rows}
    fig, axes = plt.subplots(
        len(features),
        len(methods),
        figsize=(4.2 * len(methods), 3.2 * len(features)),
        squeeze=False,
        layout="constrained",
    )
    groups = [(kind, cls) for kind in baselines for cls in CLASSES]
    for f, feature in enumerate(features):
        for m, method in enumerate(methods):
            series = {
                name: (
                    [by_key[(method, kind, feature, cls)][key] for kind, cls in groups],
                    [by_key[(method, kind, feature, cls)][f"{key}_ci95"] for kind, cls in groups],
                )
                for name, key in (("before", "before"), ("original", "original"), ("weighted", "weighted"))
            }
            report.grouped_bars(
                axes[f, m],
                [f"{kind}\n{cls}" for kind, cls in groups],
                series,
                r"$e^{y_t}/(e^{y_{t1}}+e^{y_{t2}})$",
                f"{method}, {feature} features",
            )
            axes[f, m].set_ylim(0, 1)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def example_maps(setup: Setup, results: Results, method: str, options: Dict[str, Any], count: int):
    """The first kept samples: maps of t1 (original, weighted) and the images keeping their positive
    and negative features (blur baseline)."""
    kept = results["position"][results["kept"].bool()][:count].tolist()
    if not kept:
        return None
    x = torch.stack([setup.samples.dataset[setup.positions[p]][0] for p in kept]).to(setup.device)
    with torch.no_grad():
        t1 = setup.model(x).argmax(dim=1)
    maps = [explain_maps(setup.model, x, method, target, t1, **options) for target in MAP_TARGETS]
    blurred = baseline(x, "blur")
    columns, titles, kinds = list(maps), [f"{method} original", f"{method} weighted"], ["map", "map"]
    for feature in FEATURES:
        keep_o, keep_w, _ = equal_count_keep(maps[0], maps[1], feature)
        for name, keep in (("original", keep_o), ("weighted", keep_w)):
            columns.append(torch.where(keep[:, None], x, blurred))
            titles.append(f"{feature[:3]}. kept, {name}")
            kinds.append("image")
    names = setup.class_names
    labels = [f"{setup.sample_name(p)}\nt1 = {names[c]}"[:50] for p, c in zip(kept, t1.tolist())]
    return report.example_grid(
        x.cpu(),
        [c.cpu() for c in columns],
        titles,
        labels,
        kinds,
        title="maps of t1 and the images keeping their features (blur elsewhere)",
    )


def write_report(setup: Setup, results: Results, out: Path) -> str:
    """results.md (review layout), results.csv, results.json (config, rows), samples.csv, figures.
    Returns the headline: how many samples passed the threshold, and the review's table."""
    cfg = setup.config
    methods, baselines, features = list(cfg["methods"]), cfg["baselines"], cfg["features"]
    pixels = cfg["input_size"] ** 2
    rows = summarize(results, methods, baselines, features, pixels)
    n_all, n = int(results["kept"].numel()), int(results["kept"].sum())
    kernel, sigma = blur_parameters(cfg["input_size"])
    layers = ", ".join(f"{m}: {o.get('layer', '-')}" for m, o in cfg["methods"].items())
    md = [
        f"# Masking: {cfg['model']} on {cfg['data']}",
        "",
        f"{n} of {n_all} samples have p_2 > {cfg['threshold']} (t1, t2 = the two top predicted classes). "
        f"Value: mean over samples of e^{{y_t}}/(e^{{y_t1}}+e^{{y_t2}}) after keeping only the positive (negative) "
        f"features of each map (equal pixel counts for the original O and weighted W maps); **bold**: the better "
        f"map (higher for positive, lower for negative). Blur: kernel {kernel}, σ = {sigma:.2f} "
        f"at {cfg['input_size']} px. "
        f"Layers: {layers}. "
        f"Weights sha256 `{cfg['weights_sha256'][:16]}…`; config hash `{config_hash(cfg)[:16]}…`.",
        "",
        review_table(rows, baselines) if n else "_No sample passed the threshold._",
        "",
        "Per-row CIs, the per-sample fraction where W beats O, and the kept pixel fraction: results.csv.",
        "",
    ]
    report.write_text(out / "results.md", "\n".join(md))
    report.write_csv(out / "results.csv", rows)
    report.write_json(out / "results.json", {"config": cfg, "rows": rows, "samples_file": "samples.csv"})
    report.write_csv(out / "samples.csv", sample_rows(setup, results, methods, baselines, features))
    if n:
        report.save_figure(
            figure(rows, methods, baselines, features, f"{cfg['model']} on {cfg['data']}, n = {n}"),
            out / "figure_masking.png",
        )
        first = methods[0]
        grid = example_maps(setup, results, first, cfg["methods"][first], setup.examples) if setup.examples else None
        if grid is not None:
            report.save_figure(grid, out / "example_maps.png", dpi=report.EXAMPLE_DPI)
    counts = f"{n} of {n_all} samples have p_2 > {cfg['threshold']}"
    return f"{cfg['model']} on {cfg['data']}: {counts}\n" + (
        review_table(rows, baselines) if n else "no sample passed the threshold: lower --threshold or add samples"
    )


# ---- command line ------------------------------------------------------------------------------------


HELP = "masking experiment: keep positive/negative features of original vs weighted maps (paper §5.2)"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``mask`` subcommand; its ``func`` default is :func:`run`."""
    parser = experiment_parser(subparsers, "mask", HELP, __doc__, DEFAULT_MODEL, DEFAULT_DATA)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"map methods (default: {' '.join(DEFAULT_METHODS)}; on vision transformers {' '.join(VIT_METHODS)}): "
        + ", ".join(bh.methods.available()),
    )
    parser.add_argument("--layer", default=None, help="layer of the CAM methods (default: the model's default_layer)")
    parser.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=BASELINES)
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=FEATURES)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="keep samples with p_2 > threshold")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``backprop-hooks mask``; returns the exit code."""
    for method in args.methods or ():
        bh.methods.get(method)
    if not 0 <= args.threshold < 0.5:
        raise UsageError(f"--threshold must lie in [0, 0.5) (p_2 cannot exceed 0.5), got {args.threshold}")
    params = {
        "threshold": args.threshold,
        "baselines": list(dict.fromkeys(args.baselines)),
        "features": list(dict.fromkeys(args.features)),
        "methods": {},
    }
    setup = prepare(args, "mask", params)
    from .catalog import applicable_methods, is_transformer, unfit_reason

    chosen = args.methods or (VIT_METHODS if is_transformer(setup.model) else DEFAULT_METHODS)
    for method in chosen:
        reason = unfit_reason(method, setup.model)
        if reason is not None:
            fits = applicable_methods(setup.model)
            raise UsageError(f"--methods {method}: {reason}; map methods that fit {args.model}: {', '.join(fits)}")
    methods = {m: method_options(m, setup.model, args.layer) for m in dict.fromkeys(chosen)}
    setup.config["methods"] = methods
    first, _ = setup.samples.dataset[setup.positions[0]]
    for method, options in methods.items():  # spatial-map check, before the run
        explain_maps(
            setup.model,
            first[None].to(setup.device),
            method,
            "logit",
            torch.zeros(1, dtype=torch.long, device=setup.device),
            **options,
        )
    process = masking_process(setup.model, methods, params["baselines"], params["features"], args.threshold)
    return execute(setup, args, process, write_report, desc="mask")
