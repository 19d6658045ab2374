"""ViT explanation cost: rollout, grad_rollout, transformer_attribution and vit_gradcam time ÷ one plain
forward+backward of the same batch, on a ViT-Tiny (timm ``vit_tiny_patch16_224``, random weights, fused
attention as timm ships it), batch 1 and 16, next to a batch-size-1 loop (how the earlier code ran).

    python -m bench.vit [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable, Dict, List

import timm
import torch

import backprop_hooks as bh

METHODS = ("rollout", "grad_rollout", "transformer_attribution", "vit_gradcam")
MODEL = "vit_tiny_patch16_224"


def _once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _forward_backward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        xg = x.detach().requires_grad_(True)
        y = model(xg)
        return torch.autograd.grad(y, xg, torch.ones_like(y) / y.shape[1])

    return run


def run(quick: bool = False, device: str = "cpu") -> List[Dict[str, object]]:
    """Rows: method, model, batch, seconds, ratio_to_fwd_bwd, loop_seconds (batch-size-1 loop, batch > 1).

    Rounds interleave the baseline and every method (one warm-up round first); ``seconds`` is the median
    over rounds and ``ratio_to_fwd_bwd`` the median of per-round ratios, which is robust to a shared CPU.
    """
    dev = torch.device(device)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).eval().to(dev)
    rounds = 2 if quick else 5
    rows: List[Dict[str, object]] = []
    warnings.simplefilter("ignore", bh.methods.NonLinearContrastWarning)
    for batch in (1, 16):
        x = torch.rand(batch, 3, 224, 224, device=dev)
        fns = {"forward+backward": _forward_backward(model, x)}
        for name in METHODS:
            fns[name] = (lambda m: lambda: m(x, target="weighted"))(bh.methods.get(name)(model))
        times: Dict[str, List[float]] = {name: [] for name in fns}
        for r in range(rounds + 1):
            for name, fn in fns.items():
                t = _once(fn, dev)
                if r:
                    times[name].append(t)
        for name in fns:
            ratios = [t / b for t, b in zip(times[name], times["forward+backward"])]
            loop = None
            if batch > 1 and name != "forward+backward":
                method = bh.methods.get(name)(model)
                loop = _once(lambda: [method(x[i : i + 1], target="weighted") for i in range(batch)], dev)
            rows.append(dict(method=name, model=MODEL, batch=batch, seconds=statistics.median(times[name]),
                             ratio_to_fwd_bwd=statistics.median(ratios), loop_seconds=loop))
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    lines = ["| method | model | batch | seconds | ÷ fwd+bwd | batch-1 loop s |", "|---|---|---|---|---|---|"]
    for r in rows:
        loop = "" if r["loop_seconds"] is None else f"{r['loop_seconds']:.3f}"
        lines.append(f"| {r['method']} | {r['model']} | {r['batch']} | {r['seconds']:.3f} | {r['ratio_to_fwd_bwd']:.2f} | {loop} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(table(run(args.quick, args.device)))
