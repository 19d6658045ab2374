"""`backprop-hooks explain [IMAGE ...]`: why class t and not the others, for the top-k classes of images.

For each image: one forward pass picks the top-k classes (or ``--classes``, by index or name; ``--topk``
is capped at the number of classes), then one batched explanation per target explains them (the image
repeated, a tensor of classes), in chunks of at most 16 classes (32 images for SmoothGrad/IG) so memory
stays bounded. Written per image into ``--out``: ``NAME.png`` (rows: classes; columns: the image, then
one map per target), ``NAME.pt`` (maps, attributions, logits, classes, class names, targets, method) and
``NAME.json`` (the classes and, per target and class, the map's positive and negative mass).

Each image's three files are written as soon as it is explained (each through a temporary file, so none
is ever truncated); an interruption or a later failure keeps the images already done. An input image, or
a file in ``--out`` that this command did not write, is never replaced: the outputs take the next free
name (``photo_2.png``). An unreadable image is skipped with one line and the exit code is 2 at the end.

With no IMAGE, the bundled EfficientNet-Lite0 explains the bundled photo of chelsea the cat, whose
classes 282 tiger cat, 285 Egyptian cat and 281 tabby compete.
The default method is Grad-CAM, and gradient-weighted attention rollout on vision transformers.

This module is the command (its parser and run); the work lives in :mod:`.class_explanations` (computing),
:mod:`.explain_files` (images in, figures and files out), :mod:`.arguments` (checking the command line) and
:mod:`.catalog` (which methods fit a model); the names scripts used from here (``explain_classes``,
``ClassExplanations``, ``figure``, ``table``, ``load_source``, ``target_title``, ...) still import from here.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from torch import nn
from tqdm import tqdm

import backprop_hooks as bh
from backprop_hooks import models
from backprop_hooks.errors import UsageError, choices
from backprop_hooks.models.images import PHOTOS
from backprop_hooks.plotting.labels import target_title

from .arguments import check_device, check_method, check_targets, class_index
from .catalog import DEFAULT_METHOD, applicable_methods, default_method, describe, unfit_reason
from .class_explanations import DEFAULT_CHUNK, DEFAULT_TARGETS, DEFAULT_TOPK, ClassExplanations, explain_classes
from .explain_files import (
    DEFAULT_MAX_ROWS,
    DEFAULT_PHOTO,
    check_sources,
    figure,
    load_source,
    output_names,
    table,
    write_result,
)

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_OUT = Path("out/explain")

# the command, and the names of its parts used most from here (tests, scripts)
__all__ = ["add_parser", "run", "explain_images", "ClassExplanations", "explain_classes", "figure", "target_title"]


def prepare_model(args: argparse.Namespace) -> nn.Module:
    """The model on its device, after checking the layer, classes and top-k against it."""
    model = models.create(args.model, weights=args.weights).to(check_device(args.device))
    num_classes = len(model.class_names)
    if args.layer is not None:
        bh.methods.get_module(model, args.layer)
    if args.classes is not None:
        args.classes = list(dict.fromkeys(class_index(c, model.class_names) for c in args.classes))
    elif args.topk < 1:
        raise UsageError(f"--topk must be >= 1; got {args.topk}")
    elif args.topk > num_classes:
        print(
            f"note: --topk {args.topk} exceeds the model's {num_classes} classes: explaining all {num_classes}",
            file=sys.stderr,
        )
        args.topk = num_classes
    return model


# ---- the run: one image after the other, each written as soon as it is done ----------------------------


@dataclass
class Outcome:
    """What :func:`explain_images` did: the summaries written, the images it could not read."""

    summaries: List[Dict[str, Any]]
    failed: List[str]  # one line per image that was skipped
    names: List[str]


def explain_images(
    model: nn.Module,
    sources: Sequence[str],
    out: Path,
    model_name: str,
    method: str = DEFAULT_METHOD,
    targets: Sequence[str] = DEFAULT_TARGETS,
    classes: Optional[Sequence[int]] = None,
    topk: int = DEFAULT_TOPK,
    progress: bool = True,
    echo: bool = True,
    max_rows: Optional[int] = None,
    chunk: Optional[int] = None,
    alpha: Optional[float] = None,
    **options: Any,
) -> Outcome:
    """Explain every image (file or bundled photo) and write its figure, tensors and summary into ``out``.

    Each image's files are written as soon as it is explained, so an interruption or a later failure keeps
    the images already done. An image that cannot be read is skipped with one line on stderr (listed in
    ``Outcome.failed``). A tqdm bar shows the progress of multi-image runs; ``echo`` prints each image's
    class table. Existing files are never replaced unless they are an earlier output of this command.
    ``chunk``: the most classes explained in one call (default ``DEFAULT_CHUNK``, 16).
    """
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    sources = check_sources(sources)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder")
    names = output_names(sources, out)
    outcome = Outcome([], [], [])
    bar = tqdm(
        list(zip(sources, names)),
        desc="explain",
        unit="image",
        disable=not progress or len(sources) < 2,
        file=sys.stderr,
    )
    with bar:
        try:
            for source, name in bar:
                try:
                    image = load_source(source, model)
                except UsageError as error:
                    line = f"backprop-hooks explain: error: {error}; skipped"
                    tqdm.write(line, file=sys.stderr)
                    outcome.failed.append(line)
                    continue
                result = explain_classes(
                    model, image, method, targets, classes, topk, chunk=chunk, progress=progress, **options
                )
                outcome.summaries.append(write_result(result, out, name, source, model_name, max_rows, alpha))
                outcome.names.append(name)
                if echo:
                    tqdm.write(table(result, source) + "\n", file=sys.stdout)
        except BaseException as error:
            bar.leave = False  # clear the bar: the error message stays alone on its line
            if isinstance(error, KeyboardInterrupt) and outcome.names:
                bar.close()
                print(
                    f"explain: {len(outcome.names)} of {len(sources)} images were written to {out}/ before the "
                    f"interruption: {', '.join(outcome.names)}",
                    file=sys.stderr,
                )
            raise
    return outcome


# ---- command line ------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``explain`` subcommand; its ``func`` default is :func:`run`."""
    parser = subparsers.add_parser(
        "explain",
        help="explain the top-k classes of images (figure, maps, summary)",
        description="Why class t and not the others: explain the top-k classes of images with any method and "
        "target; write a figure, the raw maps (.pt) and a summary (.json) per image. Which methods fit which "
        "model: backprop-hooks models MODEL.",
    )
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help=f"image files, or bundled photos: {', '.join(PHOTOS)} (default: {DEFAULT_PHOTO})",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"architecture (default: {DEFAULT_MODEL}): {', '.join(models.available())}",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="a local checkpoint (state dict) instead of the default weights; a class_names.json next to it "
        "(as finetune writes) names the classes",
    )
    parser.add_argument(
        "--method",
        default=None,
        help=f"method (default: {DEFAULT_METHOD}, grad_rollout on vision transformers): "
        f"{', '.join(bh.methods.available())}",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="a method option, repeatable: e.g. n_steps=64 (integrated_gradients), post=signed (fullgrad), "
        "relu=true (CAM methods), n_samples=16 (smoothgrad)",
    )
    parser.add_argument(
        "--target",
        nargs="+",
        default=list(DEFAULT_TARGETS),
        dest="targets",
        metavar="TARGET",
        help=f"targets, one column each (default: {' '.join(DEFAULT_TARGETS)}): "
        f"{', '.join(bh.targets.names())}, versus:S (S a class index or name)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--classes", nargs="+", default=None, metavar="C", help="the classes to explain (rows): indices or names"
    )
    which.add_argument(
        "--topk",
        type=int,
        default=DEFAULT_TOPK,
        help=f"explain the k most probable classes (default: {DEFAULT_TOPK}; at most the number of classes)",
    )
    parser.add_argument("--layer", default=None, help="layer of the CAM methods (default: the model's default layer)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--rows",
        type=int,
        default=DEFAULT_MAX_ROWS,
        help=f"classes drawn in a figure (default: {DEFAULT_MAX_ROWS}; all go to the .pt and .json)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="opacity of the maps over the image (default: 0.5 for layer and token maps; for pixel-space maps "
        "each pixel as opaque as it is strong)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument(
        "--list",
        action="store_true",
        help="list the model's classes, layers and the methods that fit it, then exit (as: backprop-hooks models)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``backprop-hooks explain``: validate everything, explain, write; returns the exit code."""
    if args.list:
        print(describe(models.create(args.model, weights=args.weights), args.model))
        return 0
    sources = check_sources(args.images)
    if args.method is not None:
        check_method(args.method, args.layer, args.option)
    if args.rows < 1:
        raise UsageError(f"--rows must be >= 1; got {args.rows}")
    if args.alpha is not None and not 0 < args.alpha <= 1:
        raise UsageError(f"--alpha must lie in (0, 1]; got {args.alpha}")
    model = prepare_model(args)
    method = args.method or default_method(model)
    options = check_method(method, args.layer, args.option)
    reason = unfit_reason(method, model)
    if reason is not None:
        fits = applicable_methods(model)
        raise UsageError(f"--method {method}: {reason}; methods that fit {args.model}: {choices(fits, 20)}")
    targets = check_targets(args.targets, len(model.class_names), model.class_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)  # one note below instead
        warnings.simplefilter("always", bh.errors.ImageUpsampledWarning)
        with _warnings_as_lines():
            outcome = explain_images(
                model,
                sources,
                args.out,
                args.model,
                method,
                targets,
                args.classes,
                args.topk,
                progress=args.progress,
                max_rows=args.rows,
                alpha=args.alpha,
                **options,
            )
    summaries = outcome.summaries
    nonlinear = sorted(
        {k for s in summaries for k, t in s["targets"].items() if not t["linear"] and bh.targets.get(k).contrastive}
    )
    if nonlinear:
        print(
            f"note: {method!r} is not linear in the seed: the {', '.join(nonlinear)} maps are back-propagated "
            "contrast seeds, not per-class compositions",
            file=sys.stderr,
        )
    if summaries:
        print(f"wrote {len(summaries)} figure(s), maps and summaries to {args.out}/: {', '.join(outcome.names)}")
    if outcome.failed:
        if len(sources) > 1:
            print(
                f"backprop-hooks explain: error: {len(outcome.failed)} of {len(sources)} images could not be read "
                "and were skipped (see above)",
                file=sys.stderr,
            )
        return 2
    return 0


class _warnings_as_lines:
    """Show backprop_hooks warnings as one ``warning:`` line each (no source line, no class path)."""

    def __enter__(self):
        self._show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, bh.errors.BackpropHooksWarning):
                tqdm.write(f"warning: {message}", file=sys.stderr)
            else:
                self._show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        warnings.showwarning = self._show
        return False
