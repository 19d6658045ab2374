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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

import backprop_hooks as bh
from backprop_hooks import models
from backprop_hooks.errors import UsageError
from backprop_hooks.errors import choices
from backprop_hooks.explanation import Explanation
from backprop_hooks.models.images import PHOTOS

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_METHOD = "gradcam"
DEFAULT_TARGETS = ("logit", "weighted")
DEFAULT_PHOTO = "chelsea"
DEFAULT_OUT = Path("out/explain")
DEFAULT_TOPK = 3
DEFAULT_MAX_ROWS = 10  # rows (classes) drawn in a figure; every class is in the .pt and .json
MAX_SIMILARITY = 32  # the summary's class-similarity matrix covers the first 32 classes (k x k grows fast)
DEFAULT_CHUNK = 16  # classes explained per call: memory stays bounded for any --topk
IMAGES_PER_CALL = 32  # at most this many images per call for methods that batch noise samples or path steps
STEP_OPTIONS = ("n_samples", "n_steps")  # SmoothGrad, Integrated Gradients: images per class and call
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
    chunk: Optional[int] = None,
    progress: bool = False,
    **options: Any,
) -> ClassExplanations:
    """Explain ``classes`` (default: the ``topk`` most probable) of ``image`` (3, H, W) for every target.

    One call of :func:`bh.explain` per target and chunk of ``chunk`` classes (default 16), batched over the
    classes (the image repeated); ``options`` go to the method (``layer=...``). Results are on the CPU, so
    the memory of a call stays bounded whatever the number of classes. ``progress``: a bar over the calls
    when there is more than one.
    """
    if "internal_batch_size" in method_option_names(method):  # SmoothGrad/IG: noise samples, path points
        options = {"internal_batch_size": IMAGES_PER_CALL, **options}
    x = image[None].to(_device(model))
    chosen = torch.as_tensor(classes, device=x.device) if classes is not None else top_classes(model, x, topk)
    chunk = max(1, chunk or min(DEFAULT_CHUNK, IMAGES_PER_CALL // steps_per_class(method, options)))
    parts = list(torch.split(chosen, chunk))
    work = [(t, part) for t in targets for part in parts]
    bar = tqdm(
        total=len(work),
        desc=f"  {method}",
        unit="call",
        leave=False,
        file=sys.stderr,
        delay=PROGRESS_DELAY_S,  # shown only for explanations that take a while
        disable=not progress,
    )
    pieces: Dict[str, List[Explanation]] = {}
    with bar, _ticking(bar):
        for t, part in work:
            batch = x.expand(len(part), *x.shape[1:])
            e = _to_cpu(bh.explain(model, batch, method=method, target=t, classes=part, **options))
            pieces.setdefault(bh.targets.get(t).key, []).append(e)
            bar.update()
    explanations = {key: _join(parts) for key, parts in pieces.items()}
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


PROGRESS_DELAY_S = 2.0


class _ticking:
    """Refresh ``bar`` every second from a daemon thread once it is due, so that its elapsed time moves
    during one long call (a 64-step Integrated Gradients explanation is a single call)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.tick, name="explain-progress", daemon=True)

    def tick(self) -> None:
        while not self.stop.wait(1.0):
            if time.time() - self.bar.start_t >= PROGRESS_DELAY_S:
                self.bar.refresh()

    def __enter__(self):
        if not self.bar.disable:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        return False


def steps_per_class(method: str, options: Dict[str, Any]) -> int:
    """How many images one class costs in a call: SmoothGrad's noise samples, IG's path steps, else 1."""
    import inspect

    parameters = inspect.signature(bh.methods.get(method).__init__).parameters
    for name in STEP_OPTIONS:
        if name in parameters:
            value = options.get(name, parameters[name].default)
            return max(1, int(value)) if isinstance(value, int) else 1
    return 1


def _join(parts: List[Explanation]) -> Explanation:
    """One explanation from the explanations of consecutive chunks of classes."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for name in ("attributions", "logits", "classes", "_maps"):
        setattr(first, name, torch.cat([getattr(p, name) for p in parts]))
    return first


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


def figure(result: ClassExplanations, title: str, max_rows: int = DEFAULT_MAX_ROWS, alpha: Optional[float] = None):
    """The figure: a row per class (name, index, probability), the image then one overlay per target.

    At most ``max_rows`` classes are drawn (the title says how many of how many). Pixel-space maps (an
    input-shaped method) are drawn on a scale clipped at the 99th percentile of |value|, each pixel as
    opaque as it is strong over a faded image; layer and token maps as overlays at alpha 0.5 (``alpha``
    sets one opacity for all). The colour-bar legend follows the data: a map that is
    never negative is labelled as a magnitude. A method whose maps do not depend on the class says so.
    """
    from . import plots

    keys = list(result.explanations)
    shown = min(len(result.classes), max(1, max_rows))
    rows = [f"{row_name(row)}\np = {row['probability']:.3f}, rank {row['rank']}" for row in result.class_rows()[:shown]]
    if shown < len(result.classes):
        title += f"\n(the first {shown} of {len(result.classes)} classes are drawn; all are in the .pt and .json)"
    cls = bh.methods.get(result.method) if result.method in bh.methods.available() else None
    pixel_space = cls is not None and cls.space == "input"
    if result.method in CLASS_INDEPENDENT:
        title += f"\n({result.method} does not depend on the class: every row and column shows the same map)"
    labels = []
    for k in keys:
        maps = result.maps(k)
        if bool((maps >= 0).all()):
            legend = "red: magnitude (this map has no sign)"
        elif bool((maps <= 0).all()):
            legend = "blue: all values are negative"
        else:
            legend = "red: for t, blue: against t"
        labels.append(f"{result.method} of {objective(k)}\n{legend}")
    return plots.explanation_grid(
        result.image,
        [result.maps(k)[:shown] for k in keys],
        [target_title(k, result.names) for k in keys],
        rows,
        colorbar_labels=labels,
        title=title,
        alpha=(None if pixel_space else 0.5) if alpha is None else alpha,
        percentile=99.0 if pixel_space else 100.0,
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
    from . import plots

    max_rows = DEFAULT_MAX_ROWS if max_rows is None else max_rows
    files = output_files(name)
    layer = f", layer {result.layer}" if result.layer else ""
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=folder))
    try:
        title = f"{image}: {model}, {result.method}{layer}"
        plots.save(figure(result, title, max_rows, alpha), stage / files["figure"])
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
    max_rows: int = None,
    chunk: int = None,
    alpha: Optional[float] = None,
    **options: Any,
) -> Outcome:
    """Explain every image (file or bundled photo) and write its figure, tensors and summary into ``out``.

    Each image's files are written as soon as it is explained, so an interruption or a later failure keeps
    the images already done. An image that cannot be read is skipped with one line on stderr (listed in
    ``Outcome.failed``). A tqdm bar shows the progress of multi-image runs; ``echo`` prints each image's
    class table. Existing files are never replaced unless they are an earlier output of this command.
    """
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


# ---- validation of the command line, before anything runs or is written -----------------------------

GUIDED = ("guided_backprop", "deconvnet", "guided_gradcam")
# methods whose maps do not depend on the class (the figure says so)
CLASS_INDEPENDENT = ("rollout",)


def is_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a vision transformer (it holds attention modules)."""
    from backprop_hooks.rules.attention import is_attention

    return any(is_attention(name, module) for name, module in model.named_modules())


def unfit_reason(method: str, model: nn.Module) -> Optional[str]:
    """Why ``method`` cannot explain ``model`` (in command-line words), or None when it can."""
    cls = bh.methods.get(method)
    vit = is_transformer(model)
    kind = "a vision transformer" if vit else "a convolutional network"
    if cls.space == "tokens" and not vit:
        return f"{method} reads attention and token grids, and {getattr(model, 'arch', 'this model')} is {kind}"
    if vit and (cls.space == "layer" or method == "guided_gradcam"):
        return (
            f"{method} needs a convolutional feature map (C, h, w), and {getattr(model, 'arch', 'this model')} is "
            f"{kind} (tokens); its counterpart on tokens is vit_gradcam"
        )
    if method in GUIDED:
        from backprop_hooks.methods.guided import activation_summary

        reason = activation_summary(model)
        if reason is not None:
            return reason
    return None


def applicable_methods(model: nn.Module) -> List[str]:
    """The methods that fit ``model`` (see :func:`unfit_reason`)."""
    return [m for m in bh.methods.available() if unfit_reason(m, model) is None]


def default_method(model: nn.Module) -> str:
    """The method ``explain`` uses when none is given: Grad-CAM on CNNs, gradient-weighted rollout on ViTs."""
    return "grad_rollout" if is_transformer(model) else DEFAULT_METHOD


def parse_value(text: str) -> Any:
    """``--option`` values: int, float, true/false, none, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_option_names(method: str) -> List[str]:
    """The options ``--option NAME=VALUE`` accepts for ``method`` (its constructor's keywords)."""
    import inspect

    names: List[str] = []
    for klass in bh.methods.get(method).__mro__:  # follow **kw up to the base classes' keywords
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        names += [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            break
    names = list(dict.fromkeys(n for n in names if n not in ("self", "model")))
    return [n for n in names if n not in ("layer", "check_finite")]


def parse_options(method: str, items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``["n_steps=64", "post=signed"]`` -> ``{"n_steps": 64, "post": "signed"}``, checked against the method."""
    options: Dict[str, Any] = {}
    accepted = method_option_names(method)
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise UsageError(f"--option {item!r}: expected NAME=VALUE, e.g. --option n_steps=64")
        if name not in accepted:
            what = f"options: {choices(accepted)}" if accepted else "no options"
            hint = "; give the layer with --layer" if name == "layer" else ""
            raise UsageError(f"--option {name!r} is not an option of {method}; it takes {what}{hint}")
        options[name] = parse_value(value)
    return options


def check_method(method: str, layer: Optional[str], option_items: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The method's options (``layer`` and ``--option``s); raises for an unknown method, a layer it does not
    take or an option it does not know."""
    cls = bh.methods.get(method)
    options = parse_options(method, option_items)
    if layer is None:
        return options
    if not cls.takes_layer:
        with_layer = [m for m in bh.methods.available() if bh.methods.get(m).takes_layer]
        raise UsageError(f"method {method!r} takes no --layer; methods with a layer: {choices(with_layer)}")
    return {"layer": layer, **options}


def class_index(value: Any, names: Sequence[str], what: str = "--classes") -> int:
    """A class given by index (``281``) or by name (``tabby``, case-insensitive; unique prefixes too)."""
    text = str(value).strip()
    try:
        index = int(text)
    except ValueError:
        index = None
    if index is not None:
        check_class_range([index], len(names), what)
        return index
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    found = [i for i, n in enumerate(lowered) if n.startswith(text.lower()) or f", {text.lower()}" in n]
    if len(found) == 1:
        return found[0]
    if found:
        raise UsageError(
            f"{what}: {text!r} names several classes: {choices([f'{names[i]} ({i})' for i in found], 6)}; "
            "give the index or the full name"
        )
    listing = f"classes: {choices(names, 8)}" + (
        "; list them with: backprop-hooks models MODEL" if len(names) > 8 else ""
    )
    raise UsageError(f"{what}: no class is called {text!r}; give an index 0 to {len(names) - 1} or a name ({listing})")


def check_targets(targets: Sequence[str], num_classes: int, names: Optional[Sequence[str]] = None) -> List[str]:
    """Canonical target names without repeats; ``versus:S`` classes (by index or name) must exist."""
    names = list(names) if names is not None else [str(i) for i in range(num_classes)]
    resolved = []
    for t in targets:
        if str(t).startswith("versus:"):
            other = t.split(":", 1)[1]
            t = f"versus:{class_index(other, names, what=f'target {t!r}')}"
        resolved.append(t)
    return list(dict.fromkeys(bh.targets.get(t).key for t in resolved))


def check_class_range(classes: Sequence[int], num_classes: int, what: str = "--classes") -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(
            f"{what}: class {bad[0]} is out of range; the model has {num_classes} classes: 0 to {num_classes - 1}"
        )


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        if device.type == "meta":
            raise RuntimeError("meta tensors hold no data, so nothing can be computed on them")
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
        from .catalog import describe

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
