"""`backprop-hooks explain [IMAGE ...]`: why class t and not the others, for the top-k classes of images.

For each image: one forward pass picks the top-k classes (or ``--classes``), then ONE batched explanation
per target explains all of them at once (the image repeated k times, a (k,) tensor of classes). Written
per image into ``--out``: ``NAME.png`` (rows: classes; columns: the image, then one overlay per target),
``NAME.pt`` (maps, attributions, logits, classes, class names, targets, method) and ``NAME.json`` (the
top-k classes and, per target and class, the map's positive and negative mass). Everything is written into
a temporary folder next to ``--out`` and moved there at the end: a failed run leaves ``--out`` untouched.

With no IMAGE, the bundled EfficientNet-Lite0 explains the bundled photo of chelsea the cat, whose
classes 282 tiger cat, 285 Egyptian cat and 281 tabby compete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

import backprop_hooks as bh
from backprop_hooks import models
from backprop_hooks.errors import UsageError
from backprop_hooks.errors import choices
from backprop_hooks.explanation import Explanation
from backprop_hooks.models.images import PHOTOS

from . import plots

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_METHOD = "gradcam"
DEFAULT_TARGETS = ("logit", "weighted")
DEFAULT_PHOTO = "chelsea"
DEFAULT_OUT = Path("out/explain")
DEFAULT_TOPK = 3
TARGET_TITLES = {
    "logit": "logit (original)",
    "weighted": "weighted contrast",
    "mean": "mean contrast",
    "max": "max contrast (vs runner-up)",
    "softmax": "softmax probability",
    "log_softmax": "log-softmax",
}
OBJECTIVES = {  # matplotlib mathtext
    "logit": r"$y_t$",
    "weighted": r"$y_t - \sum_{s \neq t} \alpha_s y_s$",
    "mean": r"$y_t - \mathrm{mean}_{s \neq t}\, y_s$",
    "max": r"$y_t - y_{s^*}$",
    "softmax": r"$p_t$",
    "log_softmax": r"$\log p_t$",
}


# ---- the job: explain the classes of one image ------------------------------------------------------


@dataclass
class ClassExplanations:
    """The explanations of k classes of one image: one batched :class:`Explanation` per target."""

    image: torch.Tensor  # (3, H, W) pixels in [0, 1]
    logits: torch.Tensor  # (C,)
    classes: torch.Tensor  # (k,)
    names: List[str]  # the model's C class names
    method: str
    explanations: Dict[str, Explanation]  # target key ("logit", "versus:281", ...) -> (k, ...) explanation

    @property
    def class_names(self) -> List[str]:
        """The names of the explained classes."""
        return [self.names[c] for c in self.classes.tolist()]

    @property
    def probabilities(self) -> torch.Tensor:
        """(k,) softmax probabilities of the explained classes."""
        return self.logits.softmax(dim=0)[self.classes]

    @property
    def ranks(self) -> torch.Tensor:
        """(k,) 1-based rank of each explained class among all classes (1 = predicted)."""
        return (self.logits[None, :] > self.logits[self.classes, None]).sum(dim=1) + 1

    def class_rows(self) -> List[Dict[str, Any]]:
        """One dict per explained class: index, name, probability, logit, rank."""
        return [
            {"index": c, "name": n, "probability": p, "logit": y, "rank": r}
            for c, n, p, y, r in zip(
                self.classes.tolist(),
                self.class_names,
                self.probabilities.tolist(),
                self.logits[self.classes].tolist(),
                self.ranks.tolist(),
            )
        ]

    @property
    def layer(self) -> Optional[str]:
        return next(iter(self.explanations.values())).layer

    def maps(self, target: str) -> torch.Tensor:
        """(k, H, W) signed maps of ``target``, one per class."""
        return self.explanations[target].maps


def top_classes(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) indices of the k most probable classes of the single image ``x`` (1, 3, H, W)."""
    with torch.no_grad():
        return model(x)[0].topk(k).indices


def explain_classes(
    model: nn.Module,
    image: torch.Tensor,
    method: str = DEFAULT_METHOD,
    targets: Sequence[str] = DEFAULT_TARGETS,
    classes: Optional[Sequence[int]] = None,
    topk: int = DEFAULT_TOPK,
    **options: Any,
) -> ClassExplanations:
    """Explain ``classes`` (default: the ``topk`` most probable) of ``image`` (3, H, W) for every target.

    One call of :func:`bh.explain` per target, batched over the classes (the image repeated k times);
    ``options`` go to the method (``layer=...``). Results are on the CPU.
    """
    x = image[None].to(_device(model))
    chosen = torch.as_tensor(classes, device=x.device) if classes is not None else top_classes(model, x, topk)
    batch = x.repeat(len(chosen), 1, 1, 1)
    explanations = {
        bh.targets.get(t).key: _to_cpu(bh.explain(model, batch, method=method, target=t, classes=chosen, **options))
        for t in targets
    }
    first = next(iter(explanations.values()))
    names = getattr(model, "class_names", None) or [str(i) for i in range(first.logits.shape[1])]
    return ClassExplanations(
        image=image.detach().cpu(),
        logits=first.logits[0],
        classes=first.classes,
        names=list(names),
        method=first.method,
        explanations=explanations,
    )


def _device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _to_cpu(e: Explanation) -> Explanation:
    e.maps  # computed on the explanation's device, then moved
    for name in ("attributions", "logits", "classes", "_maps"):
        setattr(e, name, getattr(e, name).cpu())
    return e


# ---- what is written: figure, tensors, summary, table ------------------------------------------------


def target_title(key: str, class_names: Sequence[str]) -> str:
    """A column header: ``"logit (original)"``, ``"weighted contrast"``, ``"versus tabby (281)"``."""
    if key.startswith("versus:"):
        other = int(key.split(":")[1])
        return f"versus {class_names[other]} ({other})"
    return TARGET_TITLES.get(key, key)


def objective(key: str) -> str:
    """The objective a target explains, as mathtext for colour-bar labels (``versus:281`` -> ``y_t - y_281``)."""
    return f"$y_t - y_{{{key.split(':')[1]}}}$" if key.startswith("versus:") else OBJECTIVES.get(key, key)


def row_name(row: Dict[str, Any]) -> str:
    """``"tabby (281)"``, or ``"class 3"`` for classes named by their index."""
    return f"class {row['index']}" if row["name"] == str(row["index"]) else f"{row['name']} ({row['index']})"


def figure(result: ClassExplanations, title: str):
    """The figure: a row per class (name, index, probability), the image then one overlay per target."""
    keys = list(result.explanations)
    rows = [f"{row_name(row)}\np = {row['probability']:.3f}, rank {row['rank']}" for row in result.class_rows()]
    return plots.explanation_grid(
        result.image,
        [result.maps(k) for k in keys],
        [target_title(k, result.names) for k in keys],
        rows,
        colorbar_labels=[f"{result.method} of {objective(k)}\nred: for t, blue: against t" for k in keys],
        title=title,
    )


def map_statistics(maps: torch.Tensor) -> Dict[str, List[float]]:
    """Per map of a (k, H, W) stack: positive and negative mass, fraction of positive pixels, max |value|."""
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
            "class_similarity": class_similarity(e.maps),
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


def write_result(result: ClassExplanations, folder: Path, name: str, image: str, model: str) -> Dict[str, Any]:
    """Write ``NAME.png``, ``NAME.pt`` and ``NAME.json`` into ``folder``; return the summary."""
    files = {"figure": f"{name}.png", "tensors": f"{name}.pt", "summary": f"{name}.json"}
    layer = f", layer {result.layer}" if result.layer else ""
    plots.save(figure(result, f"{image}: {model}, {result.method}{layer}"), folder / files["figure"])
    torch.save(tensors(result), folder / files["tensors"])
    info = summary(result, image, model, files)
    (folder / files["summary"]).write_text(json.dumps(info, indent=2) + "\n")
    return info


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
    """A (3, H, W) image in [0, 1] with the model's resize-and-crop (a file, else a bundled photo)."""
    size = tuple(getattr(model, "input_size", (224, 224)))[0]
    prep = {"crop_pct": getattr(model, "crop_pct", 0.875), "interpolation": getattr(model, "interpolation", "bilinear")}
    if Path(source).is_file():
        try:
            return models.load_image(source, size, **prep)[0]
        except OSError as error:  # PIL's UnidentifiedImageError, truncated files
            raise UsageError(f"cannot read image {source!r}: {error.__class__.__name__}: {error}") from None
    import skimage.data

    return models.load_image(getattr(skimage.data, source)(), size, **prep)[0]


def output_names(sources: Sequence[str]) -> List[str]:
    """A unique file stem per image: ``cat``, ``cat_2`` for two files called ``cat.*``."""
    names: List[str] = []
    for source in sources:
        stem, n = Path(source).stem or "image", 1
        while (stem if n == 1 else f"{stem}_{n}") in names:
            n += 1
        names.append(stem if n == 1 else f"{stem}_{n}")
    return names


# ---- all-or-nothing output folder --------------------------------------------------------------------


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success its files move into ``out``, on failure it is
    removed (with any parent folder created for it), so ``out`` is never half-written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    if out.is_dir():
        for item in stage.iterdir():
            os.replace(item, out / item.name)
        stage.rmdir()
    else:
        stage.rename(out)


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
    **options: Any,
) -> List[Dict[str, Any]]:
    """Explain every image (file or bundled photo) and write its figure, tensors and summary into ``out``.

    A tqdm bar shows the progress of multi-image runs; ``echo`` prints each image's class table. Returns
    the summaries. Nothing is left in ``out`` if any image fails.
    """
    sources = check_sources(sources)
    summaries = []
    bar = tqdm(
        list(zip(sources, output_names(sources))),
        desc="explain",
        unit="image",
        disable=not progress or len(sources) < 2,
        file=sys.stderr,
    )
    with staged_folder(out) as stage, bar:
        try:
            for source, name in bar:
                result = explain_classes(model, load_source(source, model), method, targets, classes, topk, **options)
                summaries.append(write_result(result, stage, name, source, model_name))
                if echo:
                    tqdm.write(table(result, source) + "\n", file=sys.stdout)
        except BaseException:
            bar.leave = False  # clear the bar: the error message stays alone on its line
            raise
    return summaries


# ---- validation of the command line, before anything runs or is written -----------------------------


def check_method(method: str, layer: Optional[str]) -> Dict[str, Any]:
    """The method's options (``layer``); raises for an unknown method or a layer it does not take."""
    cls = bh.methods.get(method)
    if layer is None:
        return {}
    if not cls.takes_layer:
        with_layer = [m for m in bh.methods.available() if bh.methods.get(m).takes_layer]
        raise UsageError(f"method {method!r} takes no --layer; methods with a layer: {choices(with_layer)}")
    return {"layer": layer}


def check_targets(targets: Sequence[str], num_classes: int) -> List[str]:
    """Canonical target names without repeats; ``versus:S`` classes must exist."""
    keys = list(dict.fromkeys(bh.targets.get(t).key for t in targets))
    for key in keys:
        if key.startswith("versus:"):
            check_class_range([int(key.split(":")[1])], num_classes, what=f"target {key!r}")
    return keys


def check_class_range(classes: Sequence[int], num_classes: int, what: str = "--classes") -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(
            f"{what}: class {bad[0]} is out of range; the model has {num_classes} classes: 0 to {num_classes - 1}"
        )


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise UsageError(f"device {name!r} is not available ({str(error).splitlines()[0]}); try 'cpu'") from None
    return device


def prepare_model(args: argparse.Namespace) -> nn.Module:
    """The model on its device, after checking the layer, classes and top-k against it."""
    model = models.create(args.model, weights=args.weights).to(check_device(args.device))
    num_classes = len(model.class_names)
    if args.layer is not None:
        bh.methods.get_module(model, args.layer)
    if args.classes is not None:
        check_class_range(args.classes, num_classes)
    elif not 1 <= args.topk <= num_classes:
        raise UsageError(f"--topk must lie between 1 and the number of classes, {num_classes}; got {args.topk}")
    return model


# ---- command line ------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``explain`` subcommand; its ``func`` default is :func:`run`."""
    parser = subparsers.add_parser(
        "explain",
        help="explain the top-k classes of images (figure, maps, summary)",
        description="Why class t and not the others: explain the top-k classes of images with any method and "
        "target; write a figure, the raw maps (.pt) and a summary (.json) per image.",
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
        "--weights", default=None, help="a local checkpoint (state dict) instead of the default weights"
    )
    parser.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"method (default: {DEFAULT_METHOD}): {', '.join(bh.methods.available())}",
    )
    parser.add_argument(
        "--target",
        nargs="+",
        default=list(DEFAULT_TARGETS),
        dest="targets",
        metavar="TARGET",
        help=f"targets, one column each (default: {' '.join(DEFAULT_TARGETS)}): "
        f"{', '.join(bh.targets.names())}, versus:S",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--classes", nargs="+", type=int, default=None, metavar="C", help="the classes to explain (rows)"
    )
    which.add_argument(
        "--topk", type=int, default=DEFAULT_TOPK, help=f"explain the k most probable classes (default: {DEFAULT_TOPK})"
    )
    parser.add_argument("--layer", default=None, help="layer of the CAM methods (default: the model's default layer)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar for several images")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``backprop-hooks explain``: validate everything, explain, write; returns the exit code."""
    sources = check_sources(args.images)
    options = check_method(args.method, args.layer)
    model = prepare_model(args)
    targets = check_targets(args.targets, len(model.class_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)  # one note below instead
        summaries = explain_images(
            model,
            sources,
            args.out,
            args.model,
            args.method,
            targets,
            args.classes,
            args.topk,
            progress=args.progress,
            **options,
        )
    nonlinear = sorted(
        {k for s in summaries for k, t in s["targets"].items() if not t["linear"] and bh.targets.get(k).contrastive}
    )
    if nonlinear:
        print(
            f"note: {args.method!r} is not linear in the seed: the {', '.join(nonlinear)} maps are back-propagated "
            "contrast seeds, not per-class compositions",
            file=sys.stderr,
        )
    print(f"wrote {len(sources)} figure(s), maps and summaries to {args.out}/")
    return 0
