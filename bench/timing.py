"""Timing helpers shared by the benchmarks: interleaved repeats, medians, CUDA-aware clocks, peak memory."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, List, Mapping

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(
    candidates: Mapping[str, Callable[[], object]], device: torch.device, repeats: int = 5, warmup: int = 1
) -> Dict[str, float]:
    """Median seconds of each candidate, measured interleaved (A B C A B C ...) so drift hits all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(clock(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def forward_backward(model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The floor: one forward and one ``torch.autograd.grad`` of the logit y_t to the input."""

    def run():
        xg = x.detach().requires_grad_(True)
        y = model(xg)
        seed = torch.nn.functional.one_hot(classes, y.shape[1]).to(y.dtype)
        return torch.autograd.grad(y, xg, seed)[0]

    return run


def forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One plain forward pass (autograd on, as an explanation needs it)."""

    def run():
        return model(x.detach().requires_grad_(True))

    return run


def markdown(rows: List[dict], columns: List[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
