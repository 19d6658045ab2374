"""Computing class explanations: the k classes of one image, one batched explanation per target.

:func:`explain_classes` explains ``classes`` (or the ``topk`` most probable) of one image with every target:
one :func:`~backprop_hooks.explain` call per target and chunk of classes (the image repeated, a tensor of
classes), so the memory of a call stays bounded for any number of classes; the results are on the CPU.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

import backprop_hooks as bh
from backprop_hooks.explanation import Explanation

from .catalog import DEFAULT_METHOD, method_option_names

DEFAULT_TARGETS = ("logit", "weighted")
DEFAULT_TOPK = 3
DEFAULT_CHUNK = 16  # classes explained per call: memory stays bounded for any --topk
IMAGES_PER_CALL = 32  # at most this many images per call for methods that batch noise samples or path steps
STEP_OPTIONS = ("n_samples", "n_steps")  # SmoothGrad, Integrated Gradients: images per class and call


@dataclass
class ClassExplanations:
    """The explanations of k classes of one image: one batched :class:`~backprop_hooks.Explanation` per target."""

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
    chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
    **options: Any,
) -> ClassExplanations:
    """Explain ``classes`` (default: the ``topk`` most probable) of ``image`` (3, H, W) for every target.

    One call of :func:`~backprop_hooks.explain` per target and chunk of at most ``chunk`` classes (default 16; fewer for
    methods that batch noise samples or path points, at most 32 images a call), batched over the classes (the
    image repeated); ``options`` go to the method (``layer=...``). Results are on the CPU, so the memory of a
    call stays bounded whatever the number of classes. ``progress``: a bar over the calls when there is more
    than one.
    """
    if "internal_batch_size" in method_option_names(method):  # SmoothGrad/IG: noise samples, path points
        options = {"internal_batch_size": IMAGES_PER_CALL, **options}
    x = image[None].to(_device(model))
    chosen = torch.as_tensor(classes, device=x.device) if classes is not None else top_classes(model, x, topk)
    per_call = max(1, min(chunk, IMAGES_PER_CALL // steps_per_class(method, options)))
    parts = list(torch.split(chosen, per_call))
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
            target, itself = against_itself(t, part)
            e = bh.explain(model, batch, method=method, target=target, classes=part, **options)
            e = _to_cpu(zero_rows(e, itself, t))
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


def against_itself(target: Any, classes: torch.Tensor) -> Tuple[Any, Optional[torch.Tensor]]:
    """``(target, None)``; for ``versus:S`` with ``S`` among ``classes``, a stand-in and the mask of the rows that
    would explain ``S`` against itself. The library refuses those (``y_S − y_S = 0``); the command line explains
    the other rows and shows these as the zero map they are by definition (see :func:`zero_rows`)."""
    versus = bh.targets.get(target)
    if not isinstance(versus, bh.targets.Versus) or isinstance(versus.other, torch.Tensor):
        return target, None
    other = int(versus.other)
    itself = classes == other
    if not bool(itself.any()):
        return target, None
    return bh.targets.Versus(torch.full_like(classes, other).masked_fill(itself, 1 if other == 0 else 0)), itself


def zero_rows(e: Explanation, itself: Optional[torch.Tensor], target: Any) -> Explanation:
    """``e`` with the rows of ``itself`` zeroed and its ``versus`` class that of ``target`` (see
    :func:`against_itself`)."""
    if itself is None:
        return e
    e.attributions[itself.to(e.attributions.device)] = 0
    e._maps = None
    e.extras["versus"] = bh.targets.get(target).other
    return e


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


def _per_sample(e: Explanation) -> List[str]:
    """The extras that hold one row per explained class (``versus``, FullGrad's ``input`` and ``total``)."""
    batch = e.classes.shape[0]
    return [k for k, v in e.extras.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch]


def _join(parts: List[Explanation]) -> Explanation:
    """One explanation from the explanations of consecutive chunks of classes (per-class extras joined too)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for key in _per_sample(first):
        first.extras[key] = torch.cat([p.extras[key] for p in parts])
    for name in ("attributions", "logits", "classes", "_maps"):
        setattr(first, name, torch.cat([getattr(p, name) for p in parts]))
    return first


def _to_cpu(e: Explanation) -> Explanation:
    e.maps  # computed on the explanation's device, then moved
    for key in _per_sample(e):
        e.extras[key] = e.extras[key].cpu()
    for name in ("attributions", "logits", "classes", "_maps"):
        setattr(e, name, getattr(e, name).cpu())
    return e
