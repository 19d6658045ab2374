"""Contrast targets cost nothing: ``bh.explain(method="gradient")`` for every target ÷ a plain
``torch.autograd.grad`` of the logit (goal <= 1.05), and the speed-up of the ``weighted``/``mean`` seeds
over building them from C per-class backward passes (the earlier code's approach) on a 1000-class model.

    python -m bench.targets [--quick] [--device cpu|cuda] [--model resnet18] [--batch 4] [--size 224]
"""

from __future__ import annotations

import argparse
import warnings
from typing import Dict, List

import torch
import torchvision

import backprop_hooks as bh

from .peers import per_class
from .timing import compare, forward_backward, machine, markdown

TARGETS = ["logit", "softmax", "log_softmax", "weighted", "mean", "max"]


def run(
    quick: bool = False,
    device: str = "cpu",
    model_name: str = "resnet18",
    batch: int = 4,
    size: int = 224,
    repeats: int = 21,
) -> List[Dict]:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval().to(dev)  # 1000 classes
    x = torch.rand(batch, 3, size, size, device=dev)
    classes = torch.arange(batch, device=dev) % 1000
    warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)
    candidates = {"plain autograd (logit)": forward_backward(model, x, classes)}
    for t in TARGETS:
        candidates[t] = lambda t=t: bh.explain(model, x, "gradient", t, classes=classes)
    times = compare(candidates, dev, repeats=3 if quick else repeats)
    base = times["plain autograd (logit)"]
    rows = [
        dict(bench="target overhead", model=model_name, batch=batch, size=size, target=k, seconds=v, ratio=v / base)
        for k, v in times.items()
    ]
    # per-class passes: 1000 backward passes, so a small batch and input; measured once against the seed
    xs, cs = x[:1, :, : size // 2, : size // 2], classes[:1]
    for t in ("weighted", "mean"):
        pc = compare(
            {
                "seed": lambda t=t: bh.explain(model, xs, "gradient", t, classes=cs),
                "per-class": per_class(model, xs, cs, t, 1000),
            },
            dev,
            repeats=1,
            warmup=0,
        )
        rows.append(
            dict(
                bench="seed vs C=1000 per-class passes",
                model=model_name,
                batch=1,
                size=size // 2,
                target=t,
                seconds=pc["seed"],
                per_class_seconds=pc["per-class"],
                speedup=pc["per-class"] / pc["seed"],
            )
        )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=21)
    a = p.parse_args(argv)
    rows = run(a.quick, a.device, a.model, a.batch, a.size, a.repeats)
    print(f"machine: {machine(torch.device(a.device))}")
    print(markdown([r for r in rows if "ratio" in r], ["model", "batch", "size", "target", "seconds", "ratio"]))
    print()
    print(
        markdown(
            [r for r in rows if "speedup" in r],
            ["model", "batch", "size", "target", "seconds", "per_class_seconds", "speedup"],
        )
    )


if __name__ == "__main__":
    main()
