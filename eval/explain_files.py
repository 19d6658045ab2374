"""What ``backprop-hooks explain`` reads and writes: the images (files or bundled photos), and per image a
figure, the tensors and a summary.

Written per image into ``--out``: ``NAME.png`` (rows: classes; columns: the image, then one map per target,
drawn by :mod:`backprop_hooks.plotting`), ``NAME.pt`` (maps, attributions, logits, classes, class names,
targets, method) and ``NAME.json`` (the classes and, per target and class, the map's positive and negative
mass). Each file goes through a temporary file, so none is ever truncated; an input image, or a file this
command did not write, is never replaced: the outputs take the next free name (``photo_2.png``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks import models
from backprop_hooks.errors import UsageError, choices
from backprop_hooks.models.images import PHOTOS
from backprop_hooks.plotting import explanations as plotted
from backprop_hooks.plotting import maps as drawing
from backprop_hooks.plotting.labels import legend, named_class, objective, target_title

from .catalog import CLASS_INDEPENDENT
from .class_explanations import ClassExplanations

DEFAULT_PHOTO = "chelsea"
DEFAULT_MAX_ROWS = 10  # rows (classes) drawn in a figure; every class is in the .pt and .json
MAX_SIMILARITY = 32  # the summary's class-similarity matrix covers the first 32 classes (k x k grows fast)


# ---- what is written: figure, tensors, summary, table ------------------------------------------------


def row_name(row: Dict[str, Any]) -> str:
    """``"tabby (281)"``, or ``"class 3"`` for classes named by their index."""
    return named_class(row["index"], row["name"])


def figure(result: ClassExplanations, title: str, max_rows: int = DEFAULT_MAX_ROWS, alpha: Optional[float] = None):
    """The figure: a row per class (name, index, probability), the image then one overlay per target.

    At most ``max_rows`` classes are drawn (the title says how many of how many). The scale is
    :func:`backprop_hooks.plotting.explanations.method_scale`'s: pixel-space maps (an input-shaped method) clipped at
    the 99th percentile of ``|value|``, each pixel as opaque as it is strong over a faded image; layer and token
    maps as overlays at alpha 0.5 (``alpha`` sets one opacity for all). The colour-bar legend follows the
    data: a map that is never negative is labelled as a magnitude. A method whose maps do not depend on the
    class says so.
    """
    keys = list(result.explanations)
    shown = min(len(result.classes), max(1, max_rows))
    rows = [f"{row_name(row)}\np = {row['probability']:.3f}, rank {row['rank']}" for row in result.class_rows()[:shown]]
    if shown < len(result.classes):
        title += f"\n(the first {shown} of {len(result.classes)} classes are drawn; all are in the .pt and .json)"
    if result.method in CLASS_INDEPENDENT:
        title += f"\n({result.method} does not depend on the class: every row and column shows the same map)"
    labels = [f"{result.method} of {objective(k)}\n{legend(result.maps(k))}" for k in keys]
    layer_alpha, percentile = plotted.method_scale(next(iter(result.explanations.values())))
    return drawing.explanation_grid(
        result.image,
        [result.maps(k)[:shown] for k in keys],
        [target_title(k, result.names) for k in keys],
        rows,
        colorbar_labels=labels,
        title=title,
        alpha=layer_alpha if alpha is None else alpha,
        percentile=percentile,
    )


def map_statistics(maps: torch.Tensor) -> Dict[str, List[float]]:
    """Per map of a (k, H, W) stack: positive and negative mass, fraction of positive pixels, max ``|value|``."""
    flat = maps.flatten(1).double()
    return {
        "positive_sum": flat.clamp(min=0).sum(1).tolist(),
        "negative_sum": flat.clamp(max=0).sum(1).tolist(),
        "positive_fraction": (flat > 0).double().mean(1).tolist(),
        "max_abs": flat.abs().amax(1).tolist(),
    }


def class_similarity(maps: torch.Tensor) -> List[List[float]]:
    """(k, k) cosine similarities between the maps of different classes (1: the same evidence)."""
    flat = torch.nn.functional.normalize(maps.flatten(1).double(), dim=1)
    return (flat @ flat.T).tolist()


def summary(result: ClassExplanations, image: str, model: str, files: Dict[str, str]) -> Dict[str, Any]:
    """The JSON summary of one image: classes with probabilities and logits, statistics per target and class."""
    targets = {}
    for key, e in result.explanations.items():
        stats = map_statistics(e.maps)
        values = bh.targets.get(key).objective(e.logits, e.classes).tolist()
        targets[key] = {
            "linear": e.linear,
            "per_class": [
                dict(index=c, objective=values[i], **{s: v[i] for s, v in stats.items()})
                for i, c in enumerate(result.classes.tolist())
            ],
            "class_similarity": class_similarity(e.maps[:MAX_SIMILARITY]),  # k x k grows fast: the first 32
        }
    return {
        "image": image,
        "model": model,
        "method": result.method,
        "layer": result.layer,
        "input_size": list(result.image.shape[-2:]),
        "classes": result.class_rows(),
        "targets": targets,
        "files": files,
    }


def tensors(result: ClassExplanations) -> Dict[str, Any]:
    """The raw results saved as ``.pt`` (loadable with ``torch.load(..., weights_only=True)``)."""
    return {
        "maps": {k: e.maps for k, e in result.explanations.items()},
        "attributions": {k: e.attributions for k, e in result.explanations.items()},
        "logits": result.logits,
        "classes": result.classes,
        "class_names": result.class_names,
        "targets": list(result.explanations),
        "linear": {k: e.linear for k, e in result.explanations.items()},
        "method": result.method,
        "layer": result.layer,
        "image": result.image,
    }


def table(result: ClassExplanations, name: str) -> str:
    """The classes of one image as a text table: rank, class index, name, probability, logit."""
    width = max(len("class name"), *(len(n) for n in result.class_names))
    lines = [
        f"{name}: {result.method}" + (f" at {result.layer}" if result.layer else ""),
        f"  {'rank':>4}  {'class':>5}  {'class name':<{width}}  {'prob':>6}  {'logit':>8}",
    ]
    for row in result.class_rows():
        lines.append(
            f"  {row['rank']:>4}  {row['index']:>5}  {row['name']:<{width}}  {row['probability']:>6.3f}  "
            f"{row['logit']:>8.3f}"
        )
    return "\n".join(lines)


OUTPUT_SUFFIXES = ("png", "pt", "json")


def output_files(name: str) -> Dict[str, str]:
    """The file names ``explain`` writes for one image: the figure (.png), the maps (.pt) and the summary (.json)."""
    return {"figure": f"{name}.png", "tensors": f"{name}.pt", "summary": f"{name}.json"}


def write_result(
    result: ClassExplanations,
    folder: Path,
    name: str,
    image: str,
    model: str,
    max_rows: Optional[int] = None,
    alpha: Optional[float] = None,
) -> Dict[str, Any]:
    """Write ``NAME.png``, ``NAME.pt`` and ``NAME.json`` into ``folder`` (created if needed); return the summary.

    Each file is written under a temporary name and renamed into place, the summary last: an interruption
    never leaves a truncated file, and a complete summary means its figure and tensors are complete too.
    Files get the permissions the user's umask gives new files.
    """
    max_rows = DEFAULT_MAX_ROWS if max_rows is None else max_rows
    files = output_files(name)
    layer = f", layer {result.layer}" if result.layer else ""
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=folder))
    try:
        title = f"{image}: {model}, {result.method}{layer}"
        drawing.save(figure(result, title, max_rows, alpha), stage / files["figure"])
        torch.save(tensors(result), stage / files["tensors"])
        info = summary(result, image, model, files)
        (stage / files["summary"]).write_text(json.dumps(info, indent=2) + "\n")
        for key in ("figure", "tensors", "summary"):
            os.replace(stage / files[key], folder / files[key])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return info


def is_own_output(folder: Path, name: str) -> bool:
    """Whether ``folder/NAME.json`` is a summary this command wrote (so ``NAME.*`` may be replaced)."""
    try:
        info = json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("files") == output_files(name) and "method" in info


# ---- inputs: image files or bundled photos -----------------------------------------------------------


def check_sources(sources: Sequence[str]) -> List[str]:
    """The images to explain (default: the bundled cat photo); each an existing file or a bundled photo name."""
    sources = list(sources) or [DEFAULT_PHOTO]
    for source in sources:
        if not Path(source).is_file() and source not in PHOTOS:
            what = "is a folder, not an image file" if Path(source).is_dir() else "not found"
            raise UsageError(f"image {source!r} {what}; give image files or a bundled photo: {choices(PHOTOS)}")
    return sources


def load_source(source: str, model: nn.Module) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] resized as the model's training data was (a file, else a bundled photo):
    the loader of ``models.photos(model=model)``."""
    if Path(source).is_file():
        try:
            return models.load_image(source, model=model)[0]
        except OSError as error:  # PIL's UnidentifiedImageError, truncated files
            raise UsageError(f"cannot read image {source!r}: {error.__class__.__name__}: {error}") from None
    return models.photo(source, model=model)


def output_names(sources: Sequence[str], out: Path = None) -> List[str]:
    """A unique file stem per image: ``cat``, ``cat_2`` for two files called ``cat.*``.

    A stem is skipped when one of its output files (``.png``, ``.pt``, ``.json`` in ``out``) would replace an
    input image, or an existing file this command did not write (a user's ``cat.json``): nothing but an
    earlier explanation is ever overwritten."""
    inputs = {_resolved(s) for s in sources if Path(s).is_file()}
    names: List[str] = []
    for source in sources:
        stem, n = Path(source).stem or "image", 1
        while True:
            name = stem if n == 1 else f"{stem}_{n}"
            n += 1
            if name in names:
                continue
            if out is not None:
                paths = [Path(out) / f"{name}.{suffix}" for suffix in OUTPUT_SUFFIXES]
                if any(_resolved(p) in inputs for p in paths):
                    continue
                if any(p.exists() for p in paths) and not is_own_output(Path(out), name):
                    continue
            break
        names.append(name)
    return names


def _resolved(path) -> str:
    return os.path.realpath(path)
