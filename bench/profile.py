"""Where each method's time goes: ``python -m bench.profile [--models ...] [--methods ...] [--batch 8] [--out DIR]``.

One call of each method (after warm-up calls) runs under ``torch.profiler``; the library's own code is
marked for the duration of the profile (nothing is marked otherwise): the attention capture's handlers and
module paths, the rules' forward and backward (the hooks of :func:`backprop_hooks.attach` and the backward of
every autograd node the rules build), the method's forward and its read-out. Every profiled event's *self*
time (its time minus its children's) goes to the innermost marked phase around it, so the phases add up to
the call:

* ``forward``: the model's own forward ops; ``capture``: what the attention capture adds to it (the maps
  themselves for ``rollout``; the gradient methods compute them in the backward, in ``rules bwd``);
  ``rules fwd``: the rules' forward work and hook plumbing;
* ``backward``: autograd's backward through the model; ``rules bwd``: the rules' backward work (LRP
  redistribution, hold gates, the deferred attention nodes: ``A``, ``∂f/∂A`` and the attention's gradient,
  BatchNorm pass-through, ...);
* ``read-out``: after the backward (rollout products, head fusion, ...); ``call``: the rest of the call
  (argument checks, attaching rules, the seed, the Explanation).

Each phase's time is also split by op class: ``matmul/conv`` (GEMMs, convolutions and their backward),
``attention`` (fused scaled-dot-product kernels), ``softmax``, ``memory`` (copies, fills, allocation),
``elementwise`` (every other aten op), ``python`` (the self time of marked ranges and autograd's wrappers:
interpreter and dispatch overhead). Floors (``fwd``, ``fwd+bwd``) are profiled the same way. Output:
``DIR/profile.md`` and ``DIR/profile.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import backprop_hooks as bh

from .timing import forward, forward_backward, machine, markdown, steady_allocator
from .zoo import CNN_METHODS, METHOD_OPTIONS, VIT_METHODS, build, make_input

PHASES = ("forward", "capture", "rules fwd", "backward", "rules bwd", "read-out", "call")
CLASSES = ("matmul/conv", "attention", "softmax", "memory", "elementwise", "python")
_MARK = "bh::"
_ENGINE = "autograd::engine::evaluate_function"


def op_class(name: str) -> str:
    """The op class of a profiled event's name (see the module docstring)."""
    if not name.startswith("aten::"):
        return "python"
    op = name[len("aten::") :]
    if "scaled_dot_product" in op:
        return "attention"
    if "softmax" in op:
        return "softmax"
    if op in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear") or "conv" in op:
        return "matmul/conv"
    if op in ("copy_", "clone", "contiguous", "fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "cat"):
        return "memory"
    if op.startswith("empty") or op in ("resize_", "to", "_to_copy"):
        return "memory"
    return "elementwise"


def _marked(fn: Callable, phase: str) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(_MARK + phase):
            return fn(*args, **kwargs)

    return run


def _autograd_nodes() -> List[type]:
    """The autograd Functions the library's rules build (their backward is rule work)."""
    import backprop_hooks.rules as rules_package  # noqa: F401  (imports every rule module)

    found, stack = [], list(torch.autograd.Function.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith(("backprop_hooks.", "rules.")) and "backward" in vars(cls):
            found.append(cls)
    return found


@contextlib.contextmanager
def marked() -> Iterator[None]:
    """Mark the library's phases (see the module docstring) for the duration of the block."""
    from backprop_hooks.methods.base import Method
    from backprop_hooks.rules import attention

    attach_module = importlib.import_module("backprop_hooks.attach")  # the module: the package exports the function

    targets: List[Tuple[type, str, str]] = [
        (attention.AttentionCapture, "_on_sdpa", "capture"),
        (attention.AttentionCapture, "_on_softmax", "capture:softmax"),
        (attention.AttentionCapture, "forward", "capture"),
        (attention._TimmPath, "forward", "capture"),
        (attach_module._ModuleHook, "pre", "rules fwd"),
        (attach_module._ModuleHook, "post", "rules fwd"),
        (attach_module._ModuleHook, "input_backward", "rules bwd"),
        (attach_module._ModuleHook, "output_backward", "rules bwd"),
        (Method, "forward", "forward"),
        (Method, "attribute", "read-out"),
    ]
    saved = []
    for cls, name, phase in targets:
        saved.append((cls, name, cls.__dict__[name]))
        setattr(cls, name, _marked(getattr(cls, name), phase))
    for cls in _autograd_nodes():
        saved.append((cls, "backward", cls.__dict__["backward"]))
        cls.backward = staticmethod(_marked(cls.__dict__["backward"].__func__, "rules bwd"))
    for subclass in _method_subclasses(Method):  # methods that override forward/attribute: mark theirs too
        for name, phase in (("forward", "forward"), ("attribute", "read-out")):
            if name in vars(subclass):
                saved.append((subclass, name, subclass.__dict__[name]))
                setattr(subclass, name, _marked(subclass.__dict__[name], phase))
    try:
        yield
    finally:
        for cls, name, original in reversed(saved):
            setattr(cls, name, original)


def _method_subclasses(cls: type) -> List[type]:
    out, stack = [], list(cls.__subclasses__())
    while stack:
        c = stack.pop()
        out.append(c)
        stack.extend(c.__subclasses__())
    return out


def _phase_of(event, default: str) -> str:
    """The innermost marked phase around ``event`` (itself included); the backward engine without a marked
    phase inside it is ``backward``. The model's own calls that the capture intercepts (its fused attention,
    its explicit softmax) stay ``forward``: only what the capture adds is ``capture``."""
    e, inside = event, set()
    while e is not None:
        if e.name in ("aten::scaled_dot_product_attention", "aten::softmax"):
            inside.add(e.name)
        if e.name.startswith(_MARK) and e.name != _MARK + "call":
            phase = e.name[len(_MARK) :]
            if phase == "capture:softmax":  # the handler runs the model's softmax, then adds a hold gate
                return "forward" if "aten::softmax" in inside else "capture"
            return "forward" if phase == "capture" and "aten::scaled_dot_product_attention" in inside else phase
        if e.name.startswith(_ENGINE):
            return "rules bwd" if _inside_rule_backward(e.cpu_parent) else "backward"
        e = e.cpu_parent
    return default


def _inside_rule_backward(event) -> bool:
    """Whether the nearest marked range or backward engine above ``event`` is a rule's backward: a rule that
    runs ``torch.autograd.grad`` inside its own backward (the deferred attention nodes) does rule work."""
    while event is not None:
        if event.name.startswith(_ENGINE):
            return False
        if event.name.startswith(_MARK) and event.name != _MARK + "call":
            return event.name == _MARK + "rules bwd"
        event = event.cpu_parent
    return False


def breakdown(
    fn: Callable[[], object], default: str = "call", warmup: int = 2, repeats: int = 3
) -> Dict[str, Dict[str, float]]:
    """Milliseconds of one call of ``fn`` by phase and op class: ``{phase: {class: ms}}``, plus
    ``"total"`` (the call's wall time), from the fastest of ``repeats`` profiled calls (the least disturbed).
    ``default``: the phase of unmarked work outside the backward engine (``"forward"`` for the floors,
    which are no method)."""
    for _ in range(warmup):
        fn()
    best = None
    for _ in range(repeats):
        table = _profiled(fn, default)
        if best is None or table["total"]["ms"] < best["total"]["ms"]:
            best = table
    return best


def _profiled(fn: Callable[[], object], default: str) -> Dict[str, Dict[str, float]]:
    with marked(), profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(_MARK + "call"):
            fn()
    table: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    total = 0.0
    for event in prof.events():
        if event.name == _MARK + "call":
            total = event.cpu_time_total / 1e3
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        phase = _phase_of(event, default)
        name = event.name
        kind = "python" if name.startswith(_MARK) or not name.startswith("aten::") else op_class(name)
        table[phase][kind] += event.self_cpu_time_total / 1e3
    out = {p: dict(c) for p, c in table.items()}
    out["total"] = {"ms": total}
    return out


def rows_for(
    name: str, batch: int, size: int, methods: List[str], device: torch.device, repeats: int = 3
) -> List[Dict]:
    model, layer, num_classes, is_vit = build(name, device)
    x = make_input(name, model, batch, size, device)
    t = torch.arange(batch, device=device) % num_classes
    candidates: Dict[str, Callable] = {"fwd": forward(model, x), "fwd+bwd": forward_backward(model, x, t)}
    for method in methods:
        if method not in (VIT_METHODS if is_vit else CNN_METHODS):
            continue
        options = dict(METHOD_OPTIONS.get(method, {}))
        if layer is not None and method in ("gradcam", "xgradcam", "linear_approx", "guided_gradcam"):
            options["layer"] = layer
        m = bh.methods.create(method, model, **options)
        candidates[method] = functools.partial(m, x, t, "logit")
    rows, floor = [], None
    for label, fn in candidates.items():
        table = breakdown(fn, "forward" if label in ("fwd", "fwd+bwd") else "call", repeats=repeats)
        total = table.pop("total")["ms"]
        floor = total if label == "fwd+bwd" else floor
        row: Dict = dict(model=name, batch=batch, method=label, ms=total)
        if floor:
            row["x_fwd_bwd"] = total / floor
        for phase in PHASES:
            row[phase] = 100 * sum(table.get(phase, {}).values()) / total
        by_class: Dict[str, float] = defaultdict(float)
        for classes in table.values():
            for kind, ms in classes.items():
                by_class[kind] += ms
        for kind in CLASSES:
            row[kind] = 100 * by_class.get(kind, 0.0) / total
        row["phases_ms"] = {p: {k: round(v, 2) for k, v in c.items()} for p, c in table.items()}
        rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "vgg11_bn", "vit_tiny", "hf_vit", "bert_small"])
    p.add_argument("--methods", nargs="+", default=["gradient", "gradcam", "fullgrad", "lrp"] + VIT_METHODS[:3])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3, help="profiled calls per case; the fastest is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/profile")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    steady_allocator()
    device = torch.device(a.device)
    rows = []
    for name in a.models:
        rows += rows_for(name, a.batch, a.size, a.methods, device, a.repeats)
        print(f"done: {name}", file=sys.stderr)
    meta = dict(
        machine=machine(device),
        command="python -m bench.profile " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=datetime.date.today().isoformat(),
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    columns = ["model", "method", "ms", "x_fwd_bwd", *PHASES, *CLASSES]
    text = "\n".join(
        [
            f"machine: {meta['machine']}  \ncommand: `{meta['command']}`  \ndate: {meta['date']}",
            "",
            "Share of the call's time (%) by phase, then by op class:",
            "",
            markdown([{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in rows], columns),
        ]
    )
    (out / "profile.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
