"""The benchmark harness: ``python -m bench [--quick] [--out DIR] [--methods ...] [--models ...] ...``.

For each model x batch size: the floors (one forward; one forward + backward of the logit to the input),
every method x target as a ratio to those floors, the peers' time for the same explanation (Captum,
pytorch-grad-cam, Zennit, LXT, and the earlier code's C per-class backward passes for contrast targets, and a
batch-size-1 loop for ViT rollouts), and peak tensor memory (CUDA allocator; CPU allocator events).
Everything within one model x batch is measured interleaved, so the ratios are side by side in one run.
Transformers also get the row ``capture``: the forward the gradient attention methods run (the model under
the attention capture, gradients on; fused attention deferred to the backward pass), as a ratio to the plain
forward with gradients on (``fwd``): what recording the attention calls costs in the forward. ``--scaling``
adds the ratios vs batch size, input resolution, depth and number of classes, and their plot
(``DIR/scaling.png``). ``--compile BACKEND`` adds every model compiled with
``torch.compile(model, backend=BACKEND)`` (rows ``MODEL+compile:BACKEND``), each
method's time as a ratio to the *compiled* model's own forward and forward+backward: the gradient family
runs the compiled graph; methods with rules run the eager module (their ratio shows the cost).
Output: ``DIR/results.json`` and ``DIR/results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

import backprop_hooks as bh

from . import peers as peer_lib
from .plot import scaling_figure
from .memory import peak_mib
from .timing import capture_forward, compare, forward, forward_backward, machine, markdown
from .zoo import CNN_METHODS, METHOD_OPTIONS, VIT_METHODS, build, depth_of, make_input

GOALS = {  # method -> (floor, maximum ratio) from the issues; contrast targets: <= 1.05 x logit
    "gradient": ("fwd+bwd", 1.05),
    "gradcam": ("fwd", 1.10),
    "fullgrad": ("fwd+bwd", 2.0),
    "lrp": ("fwd+bwd", 2.0),
    "capture": ("fwd", 1.10),  # the attention capture's forward
    "rollout": ("fwd+bwd", 1.5),
    "grad_rollout": ("fwd+bwd", 1.30),
    "transformer_attribution": ("fwd+bwd", 1.8),  # one forward, two backward passes: see bench/RESULTS.md
    "attnlrp": ("fwd+bwd", 2.0),
}
MEMORY_GOALS = {"attnlrp": 1.5}  # peak memory ÷ forward+backward; every other method: 1.2
ROLLOUTS = ("rollout", "grad_rollout", "transformer_attribution")


def explain_fn(method: str, model, x, t, target: str, layer) -> Callable:
    options = dict(METHOD_OPTIONS.get(method, {}))
    if layer is not None and method in ("gradcam", "xgradcam", "linear_approx", "guided_gradcam", "vit_gradcam"):
        options["layer"] = layer
    m = bh.methods.create(method, model, **options)
    return lambda: m(x, classes=t, target=target)


def loop_fn(method: str, model, x, t, layer) -> Callable:
    """The earlier ViT code: one sample at a time."""
    fns = [explain_fn(method, model, x[i : i + 1], t[i : i + 1], "logit", layer) for i in range(x.shape[0])]
    return lambda: [f() for f in fns]


def bench_case(
    model_name: str,
    batch: int,
    size: int,
    methods: List[str],
    targets: List[str],
    device: torch.device,
    repeats: int,
    with_peers: bool,
    with_memory: bool,
    with_per_class: bool,
    skip_peers: Sequence[str] = (),
    compile_backend: Optional[str] = None,
) -> List[Dict]:
    model, layer_name, num_classes, is_vit = build(model_name, device)
    x = make_input(model_name, model, batch, size, device)
    if compile_backend is not None:  # floors and methods on the compiled model; no peers, no memory
        model = torch.compile(model, backend=compile_backend)
        model_name = f"{model_name}+compile:{compile_backend}"
        with_peers = with_memory = with_per_class = False
    t = torch.arange(batch, device=device) % num_classes
    layer = bh.methods.get_module(model, layer_name) if layer_name else None
    candidates: Dict[str, Callable] = {"fwd": forward(model, x), "fwd+bwd": forward_backward(model, x, t)}
    applicable = [m for m in methods if m in (VIT_METHODS if is_vit else CNN_METHODS)]
    if is_vit and any(m in ROLLOUTS for m in applicable):
        candidates["capture"] = capture_forward(model, x)
    for method in applicable:
        for target in targets:
            candidates[f"{method}|{target}"] = explain_fn(method, model, x, t, target, layer_name)
        if with_peers:
            for peer, fn in peer_lib.peers(method, model, x, t, layer, skip_peers).items():
                candidates[f"{method}|logit|{peer}"] = fn
            if is_vit and method in ROLLOUTS and batch > 1:
                candidates[f"{method}|logit|batch-1 loop"] = loop_fn(method, model, x, t, layer_name)
    if with_per_class and "gradient" in applicable and batch == 1:
        for target in ("weighted", "mean"):
            if target in targets:
                candidates[f"gradient|{target}|per-class passes"] = peer_lib.per_class(model, x, t, target, num_classes)
    times = compare(candidates, device, repeats=repeats)
    rows = []
    for key, seconds in times.items():
        method, target, peer = (key.split("|") + ["", ""])[:3] if "|" in key else (key, "", "")
        row = dict(
            model=model_name,
            batch=batch,
            size=size,
            method=method,
            target=target,
            impl=peer or "backprop_hooks",
            seconds=seconds,
            x_fwd=seconds / times["fwd"],
            x_fwd_bwd=seconds / times["fwd+bwd"],
        )
        if target and not peer and f"{method}|logit" in times:
            row["x_logit"] = seconds / times[f"{method}|logit"]
        if peer and f"{method}|{target}" in times:
            row["peer_x_ours"] = seconds / times[f"{method}|{target}"]
        if with_memory:
            row["peak_mib"] = peak_mib(candidates[key], device)
        rows.append(row)
    del model
    return rows


def check_goals(rows: List[Dict]) -> List[Dict]:
    """One line per goal of the issues, with the measured ratio and whether it is met."""
    out = []
    for r in rows:
        if r["method"] == "capture":
            out.append(
                dict(
                    model=r["model"],
                    batch=r["batch"],
                    goal="capture <= 1.1x fwd",
                    measured=r["x_fwd"],
                    met=r["x_fwd"] <= 1.1,
                )
            )
        if r["impl"] != "backprop_hooks" or not r["target"]:
            continue
        if r["method"] in GOALS and r["target"] == "logit":
            floor, limit = GOALS[r["method"]]
            ratio = r["x_fwd"] if floor == "fwd" else r["x_fwd_bwd"]
            out.append(
                dict(
                    model=r["model"],
                    batch=r["batch"],
                    goal=f"{r['method']} <= {limit}x {floor}",
                    measured=ratio,
                    met=ratio <= limit,
                )
            )
        if r["target"] != "logit" and "x_logit" in r and r["method"] in ("gradient", "gradcam", "fullgrad", "lrp"):
            out.append(
                dict(
                    model=r["model"],
                    batch=r["batch"],
                    goal=f"{r['method']} {r['target']} <= 1.05x logit",
                    measured=r["x_logit"],
                    met=r["x_logit"] <= 1.05,
                )
            )
    fb = {(r["model"], r["batch"]): r for r in rows if r["method"] == "fwd+bwd"}
    for r in rows:
        if "peak_mib" in r and r["target"] == "logit" and r["impl"] == "backprop_hooks":  # every method: <= 1.2x
            base = fb[(r["model"], r["batch"])].get("peak_mib") or float("nan")
            limit = MEMORY_GOALS.get(r["method"], 1.2)
            out.append(
                dict(
                    model=r["model"],
                    batch=r["batch"],
                    goal=f"{r['method']} peak memory <= {limit}x fwd+bwd",
                    measured=r["peak_mib"] / base if base else float("nan"),
                    met=base and r["peak_mib"] / base <= limit,
                )
            )
    return out


SCALING = {  # model -> methods whose ratios are swept (the transformer rows include the capture)
    "resnet18": ["gradient", "gradcam", "fullgrad", "lrp"],
    "vit_tiny": ["rollout", "grad_rollout", "transformer_attribution"],
}
DEPTHS = {
    "resnet18": ["resnet18", "resnet34", "resnet50"],
    "vit_tiny": ["vit_tiny_d3", "vit_tiny_d6", "vit_tiny", "vit_tiny_d24"],
}


class Progress:
    """One line per measured case on stderr, before the table: ``[3/8] vit_tiny batch 2: 21 rows, 42 s``."""

    def __init__(self, total: int, prefix: str = "") -> None:
        self.total, self.prefix, self.done = total, prefix, 0

    def __call__(self, what: str, rows: List[Dict], started: float) -> None:
        self.done += 1
        seconds = time.perf_counter() - started
        print(f"[{self.prefix}{self.done}/{self.total}] {what}: {len(rows)} rows, {seconds:.0f} s", file=sys.stderr)


def scaling(device: torch.device, quick: bool, repeats: int) -> List[Dict]:
    """Ratios vs batch size (224 px), input resolution (batch 4), depth (batch 4: ResNet-18/34/50, ViT-Tiny with
    3 to 24 blocks) for the methods of ``SCALING``, and contrast targets vs number of classes (weighted ÷ logit)."""
    rows = []
    batches = [1, 4, 16] if quick else [1, 4, 16, 64]
    sizes = [112, 224] if quick else [112, 224, 448]

    depths = {name: DEPTHS[name][: 3 if quick else None] for name in SCALING}
    progress = Progress(sum(len(batches) + len(sizes) + len(depths[n]) for n in SCALING) + 3, "scaling ")

    def case(name: str, batch: int, size: int, methods: List[str], targets=("logit",)) -> List[Dict]:
        started = time.perf_counter()
        found = bench_case(name, batch, size, methods, list(targets), device, repeats, False, False, False)
        progress(f"{name} batch {batch}, {size} px", found, started)
        return found

    for model_name, methods in SCALING.items():
        for b in batches:
            rows += [dict(r, sweep="batch") for r in case(model_name, b, 224, methods)]
        for s in sizes:  # ViT-Tiny is built with dynamic_img_size: 49 to 784 patches
            rows += [dict(r, sweep="size") for r in case(model_name, 4, s, methods)]
        for name in depths[model_name]:
            rows += [dict(r, sweep="depth", depth=depth_of(name)) for r in case(name, 4, 224, methods)]
    for c in [10, 100, 1000]:
        size = 224 if not quick else 112
        found = case(f"resnet18@{c}", 4, size, ["gradient"], ("logit", "weighted", "mean", "max"))
        rows += [dict(r, sweep="classes", classes=c) for r in found]
    return rows


def write_results(out: Path, meta: dict, rows: List[dict]) -> str:
    """Write ``out/results.json`` and ``out/results.md`` (and the scaling figure) for ``rows``; returns the text."""
    goals = check_goals([r for r in rows if "sweep" not in r])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows, goals=goals), indent=1))
    main_rows = [r for r in rows if "sweep" not in r]
    text = [
        f"machine: {meta['machine']}  \ncommand: `{meta['command']}`  \ndate: {meta['date']}",
        "",
        markdown(
            main_rows,
            [
                "model",
                "batch",
                "method",
                "target",
                "impl",
                "seconds",
                "x_fwd",
                "x_fwd_bwd",
                "x_logit",
                "peer_x_ours",
                "peak_mib",
            ],
        ),
        "",
        "Goals:",
        "",
        markdown(goals, ["model", "batch", "goal", "measured", "met"]),
    ]
    sweep = [r for r in rows if "sweep" in r]
    if sweep:
        text += [
            "",
            "Scaling:",
            "",
            markdown(
                sweep,
                [
                    "sweep",
                    "model",
                    "batch",
                    "size",
                    "depth",
                    "classes",
                    "method",
                    "target",
                    "seconds",
                    "x_fwd",
                    "x_fwd_bwd",
                    "x_logit",
                ],
            ),
        ]
        figure = scaling_figure(sweep, out / "scaling.png")
        if figure is not None:
            text += ["", f"![ratios vs batch, resolution, depth and classes]({figure.name})"]
    (out / "results.md").write_text("\n".join(text) + "\n")
    return "\n".join(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small models and inputs: a few minutes on 2 CPU cores")
    p.add_argument("--out", default="out/bench", help="folder for results.json and results.md")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: all of {CNN_METHODS + VIT_METHODS}")
    p.add_argument("--targets", nargs="+", default=["logit", "weighted", "mean", "max"])
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="resnet18 resnet50 vgg11_bn vgg16_bn vit_tiny tv_vit hf_vit bert_small gpt2_small llama_small (suffix @C: "
        "C classes; vit_tiny_dN: N blocks)",
    )
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--skip-peers", nargs="+", default=[], metavar="METHOD:PEER", help="e.g. fullgrad:pytorch-grad-cam")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--scaling", action="store_true", help="also the ratios vs batch size, resolution, depth and number of classes"
    )
    p.add_argument(
        "--per-class", action="store_true", help="also time the earlier code's C per-class backward passes (batch 1)"
    )
    p.add_argument(
        "--compile",
        default=None,
        metavar="BACKEND",
        help="also measure every model compiled with torch.compile(backend=BACKEND), e.g. inductor",
    )
    a = p.parse_args(argv)
    device = torch.device(a.device)
    warnings.simplefilter("ignore")
    models = a.models or (["resnet18", "vit_tiny"] if a.quick else ["resnet50", "vgg16_bn", "vit_tiny"])
    batches = a.batch or ([2] if a.quick else [8, 32])
    size = a.size or (112 if a.quick else 224)
    repeats = a.repeats or (3 if a.quick else 5)
    methods = a.methods or CNN_METHODS + VIT_METHODS
    meta = dict(
        machine=machine(device),
        device=str(device),
        command="python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=datetime.date.today().isoformat(),
        python=platform.python_version(),
        torch=torch.__version__,
    )
    out = Path(a.out)
    rows = []
    cases = [(m, b) for m in models for b in batches + ([1] if a.per_class and 1 not in batches else [])]
    progress = Progress(len(cases) + (len(models) * len(batches) if a.compile else 0))
    print(f"python -m bench: {progress.total} case(s) on {device}; results in {out}/results.md", file=sys.stderr)
    for model_name, b in cases:
        ms = methods if b in batches else ["gradient"]  # batch 1: the per-class comparison only
        started = time.perf_counter()
        found = bench_case(
            model_name,
            b,
            size,
            ms,
            a.targets,
            device,
            repeats,
            not a.no_peers,
            not a.no_memory and b in batches,
            a.per_class,
            a.skip_peers,
        )
        rows += found
        write_results(out, meta, rows)  # a run stopped early keeps what it measured
        progress(f"{model_name} batch {b}", found, started)
        if a.compile and b in batches:
            started = time.perf_counter()
            found = bench_case(model_name, b, size, ms, a.targets, device, repeats, False, False, False, (), a.compile)
            rows += found
            write_results(out, meta, rows)
            progress(f"{model_name}+compile:{a.compile} batch {b}", found, started)
    if a.scaling:
        rows += scaling(device, a.quick, repeats)
    print(write_results(out, meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
