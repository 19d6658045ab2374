r"""`backprop-hooks faithfulness`: score logit and contrast explanations with Quantus' faithfulness metrics.

An evaluation independent of the paper's own protocols. For each sample with class t (the ground truth; the
prediction for unlabelled photos), each method and each *explained* target (logit, weighted, mean, max), the
explanation comes from :func:`backprop_hooks.interop.quantus_explain` (channel-summed maps, (B, 1, H, W)).
Each is scored against each *measured* potential: the model is wrapped in
:class:`backprop_hooks.interop.Potentials`, whose output at t is the logit ``y_t``, the log-odds
``log(p_t / (1 − p_t))`` (the weighted contrast's potential) or the margin ``y_t − max_{s≠t} y_s`` (max).
So "is the weighted explanation faithful to the weighted contrast?" is measured on the log-odds, not on y_t.

Metrics (Quantus), each a per-sample score:

* ``pixel_flipping``: pixels flipped to black in the explanation's order (most positive first), in 16 equal
  steps; score = mean of the measured output over the curve (lower = more faithful);
* ``region_perturbation``: square patches ranked by summed attribution replaced, 16 steps; score = AOPC,
  the mean drop ``P(x) − P(x_k)`` (higher = more faithful);
* ``faithfulness_correlation``: Pearson correlation between the summed attribution of random pixel subsets
  and the output drop when they are blacked out (higher = more faithful);
* ``road``: ROAD (noisy linear imputation of the top-ranked pixels, MoRF), score = mean top-1 accuracy of
  class t over the removal percentages (lower = more faithful). It reads the argmax only, which is the
  same for every potential: one column.

Reported: per-sample means with 95 % CIs, and paired per-sample differences of every contrast against the
logit explanation (same samples, same random subsets: the generator is reset per batch and metric).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks.errors import UsageError, require
from backprop_hooks.interop import Potentials, quantus_explain

from . import report
from .experiment import Setup, experiment_parser, execute, method_options, prepare, target_of
from .runner import Process, Results, config_hash

DEFAULT_MODEL = "digits_cnn"
DEFAULT_DATA = "digits"
DEFAULT_METHODS = ("gradient", "input_x_gradient", "gradcam")
DEFAULT_EXPLAINED = ("logit", "weighted", "mean", "max")
DEFAULT_MEASURED = ("logit", "weighted", "max")
METRICS = ("pixel_flipping", "region_perturbation", "faithfulness_correlation", "road")
HEADLESS = ("road",)  # metrics that read the argmax only: one measured column
BETTER = {
    "pixel_flipping": "lower",
    "region_perturbation": "higher",
    "faithfulness_correlation": "higher",
    "road": "lower",
}
TITLES = {
    "pixel_flipping": "pixel flipping (mean P_t over the MoRF curve)",
    "region_perturbation": "region perturbation (AOPC of P_t, MoRF)",
    "faithfulness_correlation": "faithfulness correlation",
    "road": "ROAD (MoRF accuracy, noisy linear imputation)",
}
MEASURED_TITLES = {
    "logit": "y_t",
    "weighted": "log-odds",
    "max": "y_t − y_s*",
    "mean": "y_t − mean y_s",
    "argmax": "top-1 of t",
}


def metric_settings(size: int) -> Dict[str, Dict[str, Any]]:
    """Quantus options scaled to the image side ``size`` (32 px digits, 224 px photos)."""
    pixels = size * size
    return {
        "pixel_flipping": {"features_in_step": pixels // 16, "perturb_baseline": "black"},
        "region_perturbation": {"patch_size": max(2, size // 8), "regions_evaluation": 16, "order": "morf"},
        "faithfulness_correlation": {"nr_runs": 40, "subset_size": max(16, pixels // 16), "perturb_baseline": "black"},
        "road": {"percentages": [10, 30, 50, 70, 90]},
    }


def make_metric(name: str, options: Dict[str, Any]):
    """The Quantus metric ``name`` (pixel_flipping, region_perturbation, faithfulness_correlation, road), per sample."""
    quantus = require("quantus", "interop")
    common = dict(disable_warnings=True, display_progressbar=False)
    if name == "pixel_flipping":
        return quantus.PixelFlipping(**options, **common)
    if name == "region_perturbation":
        return quantus.RegionPerturbation(**options, **common)
    if name == "faithfulness_correlation":
        return quantus.FaithfulnessCorrelation(**options, return_aggregate=False, **common)
    if name == "road":

        class PerSampleROAD(quantus.ROAD):
            """Quantus' ROAD, per sample. Quantus 0.6 averages over samples (keeping the first batch only), and
            ranks channel-broadcast attributions over C·H·W indices where its imputation expects H·W pixel
            indices: here (B, 1, H, W) maps rank pixels."""

            def evaluate_batch(self, model, x_batch, y_batch, a_batch, **kwargs):
                b = a_batch.shape[0]
                order = np.argsort(-a_batch.reshape(b, -1), axis=1)
                results = []
                for p in self.percentages:
                    top = order[:, : int(order.shape[1] * p / 100)]
                    perturbed = np.stack([self.perturb_func(arr=xe, indices=k) for xe, k in zip(x_batch, top)])
                    x_input = model.shape_input(perturbed, x_batch.shape, channel_first=True, batched=True)
                    results.append(y_batch == np.argmax(model.predict(x_input), axis=-1))
                return [np.stack(results, axis=1).astype(int)]

            def custom_postprocess(self, **kwargs):
                self.evaluation_scores = np.concatenate(self.evaluation_scores, axis=0).mean(axis=1)

        return PerSampleROAD(**options, **common)
    raise UsageError(f"unknown metric {name!r}; accepted: {', '.join(METRICS)}")


def per_sample(name: str, scores: Any) -> np.ndarray:
    """One number per sample: curves become their mean (pixel flipping, AOPC), scores stay."""
    if name in ("pixel_flipping", "region_perturbation"):
        return np.array([float(np.mean(curve)) for curve in scores])
    return np.asarray(scores, dtype=np.float64).reshape(-1)


def key(method: str, explained: str, metric: str, measured: str) -> str:
    """The results key of one (method, explained target, metric, measured potential) cell."""
    return f"{method}|{explained}|{metric}|{measured}"


def faithfulness_process(
    model: nn.Module,
    methods: Dict[str, Dict[str, Any]],
    explained: Sequence[str],
    measured: Sequence[str],
    metrics: Sequence[str],
    settings: Dict[str, Dict[str, Any]],
    seed: int,
) -> Process:
    """The per-batch job: every (method, explained, metric, measured) score, (B,) each."""
    heads = {m: Potentials(model, m) for m in measured}

    def process(x: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> Results:
        logits, t = target_of(model, x, labels)
        xs, ts = x.detach().cpu().numpy(), t.cpu().numpy()
        out: Results = {"label": labels, "t": t, "p_t": logits.softmax(1).gather(1, t[:, None])[:, 0]}
        for m in measured:
            with torch.no_grad():
                out[f"potential|{m}"] = bh.targets.get(m).potential(logits, t)
        for method, options in methods.items():
            for target in explained:
                explain = quantus_explain(method=method, target=target, channels="sum", **options)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    a = explain(model, xs, ts)
                for metric in metrics:
                    for m in measured[:1] if metric in HEADLESS else measured:
                        scorer = make_metric(metric, settings[metric])
                        np.random.seed(seed + int(positions[0]))  # the same random subsets for every explanation
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            scores = scorer(
                                model=heads[m],
                                x_batch=xs,
                                y_batch=ts,
                                a_batch=a,
                                device=str(x.device),
                                batch_size=len(xs),
                                softmax=False,  # Quantus 0.6 applies a softmax by default in most of these
                            )
                        value = torch.as_tensor(per_sample(metric, scores), dtype=torch.float64)
                        out[key(method, target, metric, "argmax" if metric in HEADLESS else m)] = value
        return out

    return process


# ---- summary and report ------------------------------------------------------------------------------


def columns(metrics: Sequence[str], measured: Sequence[str]) -> List[tuple]:
    """The (metric, measured potential) columns of the tables; metrics that read the argmax only get one."""
    return [(metric, m) for metric in metrics for m in (["argmax"] if metric in HEADLESS else measured)]


def summarize(results: Results, methods, explained, metrics, measured) -> List[Dict[str, Any]]:
    """One row per method, explained target, metric and measured potential: mean and 95 % CI over samples."""
    rows = []
    n = int(results["t"].numel())
    for method in methods:
        for target in explained:
            for metric, m in columns(metrics, measured):
                mean, ci = report.mean_ci(results[key(method, target, metric, m)])
                rows.append(dict(method=method, explained=target, metric=metric, measured=m, n=n, mean=mean, ci95=ci))
    return rows


def paired(results: Results, methods, explained, metrics, measured, reference: str = "logit") -> List[Dict[str, Any]]:
    """Per-sample differences ``score(contrast explanation) − score(logit explanation)`` with 95 % CIs,
    signed so that a positive ``gain`` means the contrast explanation is more faithful."""
    rows = []
    for method in methods:
        for target in explained:
            if target == reference:
                continue
            for metric, m in columns(metrics, measured):
                diff = results[key(method, target, metric, m)] - results[key(method, reference, metric, m)]
                sign = 1.0 if BETTER[metric] == "higher" else -1.0
                mean, ci = report.mean_ci(sign * diff)
                rows.append(dict(method=method, explained=target, metric=metric, measured=m, gain=mean, ci95=ci))
    return rows


def _cell(mean: float, ci: float, digits: int = 3) -> str:
    return f"{report.fmt(mean, digits)} ± {report.fmt(ci, digits)}"


def score_table(rows, metric: str, explained, measured) -> str:
    """The Markdown table of one metric: a row per method and explained target, a column per measured potential."""
    heads = ["argmax"] if metric in HEADLESS else list(measured)
    by = {(r["method"], r["explained"], r["measured"]): r for r in rows if r["metric"] == metric}
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for target in explained:
            lines.append(
                [method, target]
                + [_cell(by[(method, target, h)]["mean"], by[(method, target, h)]["ci95"]) for h in heads]
            )
    titles = ["top-1 of t"] if metric in HEADLESS else [f"measured {MEASURED_TITLES.get(h, h)}" for h in heads]
    return report.markdown_table(["method", "explained"] + titles, lines)


def verdict_table(pairs, metrics, measured) -> str:
    """The headline: each contrast explanation against the logit explanation, measured on its own potential
    (and on y_t, the logit's), gain > 0 = the contrast explanation is more faithful."""
    lines = []
    by = {(r["method"], r["explained"], r["metric"], r["measured"]): r for r in pairs}
    for (method, target, metric, m), r in by.items():
        if m not in (target, "logit", "argmax"):
            continue
        sig = "yes" if r["gain"] - r["ci95"] > 0 else ("no (worse)" if r["gain"] + r["ci95"] < 0 else "tie")
        lines.append([method, target, metric, MEASURED_TITLES.get(m, m), _cell(r["gain"], r["ci95"]), sig])
    return report.markdown_table(
        ["method", "contrast", "metric", "measured", "gain over logit ± CI95", "contrast more faithful?"], lines
    )


def write_report(setup: Setup, results: Results, out: Path) -> None:
    """Write results.md (the tables), results.json, results.csv and samples.csv of one run to ``out``."""
    cfg = setup.config
    methods, explained, measured, metrics = cfg["methods"], cfg["explained"], cfg["measured"], cfg["metrics"]
    rows = summarize(results, methods, explained, metrics, measured)
    pairs = paired(results, methods, explained, metrics, measured)
    n = rows[0]["n"]
    truth = "ground-truth label" if cfg["labelled"] else "the model's prediction (photos have no ground truth)"
    md = [
        f"# Faithfulness (Quantus {cfg['quantus']}): {cfg['model']} on {cfg['data']}",
        "",
        f"Command: `{cfg['command']}`",
        "",
        f"n = {n} samples; t = {truth}; mean p_t = {float(results['p_t'].mean()):.3f}. Explanations: "
        f"{', '.join(methods)} (channel-summed, signed) of the targets {', '.join(explained)}. Measured on the "
        f"potential of {', '.join(MEASURED_TITLES.get(m, m) for m in measured)} through "
        "`bh.interop.Potentials`. Per-sample means ± 95 % CIs (Student t). Metric options: "
        f"`{cfg['settings']}`. Weights sha256 `{cfg['weights_sha256'][:16]}…`; config hash "
        f"`{config_hash(cfg)[:16]}…`.",
        "",
        "## Headline: each contrast explanation against the logit explanation",
        "",
        "Paired per-sample gains (signed so that > 0 means more faithful), measured on the contrast's own "
        "potential and on y_t. 'yes'/'no (worse)': the 95 % CI excludes 0.",
        "",
        verdict_table(pairs, metrics, measured),
        "",
    ]
    for metric in metrics:
        md += [
            f"## {TITLES[metric]} ({BETTER[metric]} = more faithful)",
            "",
            score_table(rows, metric, explained, measured),
            "",
        ]
    report.write_text(out / "results.md", "\n".join(md))
    report.write_csv(out / "results.csv", rows)
    report.write_json(out / "results.json", {"config": cfg, "rows": rows, "paired": pairs})
    samples = []
    for s in range(int(results["t"].numel())):
        row = setup.sample_row(results, s, t="t")
        row.update({k: float(v[s]) for k, v in results.items() if "|" in k})
        samples.append(row)
    report.write_csv(out / "samples.csv", samples)


# ---- command line ------------------------------------------------------------------------------------


HELP = "Quantus faithfulness metrics of logit vs contrast explanations, measured on each potential"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``faithfulness`` subcommand; its ``func`` default is :func:`run`."""
    parser = experiment_parser(subparsers, "faithfulness", HELP, __doc__, DEFAULT_MODEL, DEFAULT_DATA)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="explanation methods")
    parser.add_argument("--layer", default=None, help="layer of the layer methods (default: the model's)")
    parser.add_argument("--explained", nargs="+", default=list(DEFAULT_EXPLAINED), help="explained targets")
    parser.add_argument("--measured", nargs="+", default=list(DEFAULT_MEASURED), help="potentials measured")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), help="Quantus metrics: " + ", ".join(METRICS))
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``backprop-hooks faithfulness``; returns the exit code."""
    require("quantus", "interop")
    for metric in args.metrics:
        if metric not in METRICS:
            raise UsageError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    explained = list(dict.fromkeys(bh.targets.get(t).key for t in args.explained))
    measured = list(dict.fromkeys(bh.targets.get(t).key for t in args.measured))
    if "logit" not in explained:
        explained.insert(0, "logit")  # the reference of the paired differences
    params = {
        "methods": list(dict.fromkeys(args.methods)),
        "explained": explained,
        "measured": measured,
        "metrics": list(dict.fromkeys(args.metrics)),
        "layer": args.layer,
        "command": "python -m backprop_hooks " + " ".join(sys.argv[1:]),
        "quantus": require("quantus", "interop").__version__,
    }
    setup = prepare(args, "faithfulness", params)
    setup.config["settings"] = metric_settings(int(setup.config["input_size"]))
    methods = {m: method_options(m, setup.model, args.layer) for m in params["methods"]}
    setup.config["options"] = {m: {k: str(v) for k, v in o.items()} for m, o in methods.items()}
    process = faithfulness_process(
        setup.model, methods, explained, measured, params["metrics"], setup.config["settings"], args.seed
    )
    return execute(setup, args, process, write_report, desc="faithfulness")
