"""Timing helpers shared by the benchmarks: interleaved repeats, medians, CUDA-aware clocks, a steady CPU
allocator.

Why the allocator: on Linux, glibc's ``malloc`` hands freed memory back to the operating system (``munmap``
of blocks above a threshold, trimming the top of the heap), and raises those thresholds as it sees larger
blocks freed. A call that finds its memory handed back touches fresh pages, and each first touch is a page
fault in which the kernel zeroes 4 KiB: on a ViT-Tiny forward at batch 8 that was 50 000–80 000 faults, a
quarter of the call's time, and how many faults a call takes depends on what ran *before* it (the sizes
earlier calls freed). So a ratio depended on the order of the measurements and on anything run between them,
the peak-memory measurement included (it runs each candidate once more, under the profiler).
:func:`steady_allocator` pins both thresholds (``mallopt``) before anything is timed: freed memory stays
mapped and is reused, every candidate runs on resident pages after its warm-up, whatever ran before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Mapping

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks above it are still mapped fresh each time
_steady = None


def steady_allocator() -> bool:
    """Keep freed CPU memory mapped for reuse (glibc: ``mallopt`` of the trim and mmap thresholds, see the
    module docstring); once per process. True when in effect (Linux with glibc), False elsewhere."""
    global _steady
    if _steady is None:
        _steady = False
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _steady = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # an int: the largest it takes
            )
    return _steady


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
    """Median seconds of each candidate, measured interleaved (A B C A B C ...) so drift hits all alike, on a
    :func:`steady_allocator`."""
    steady_allocator()
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
    """One plain forward pass (autograd on and the input requiring grad, as an explanation needs it: the graph
    is recorded, as in every method's forward)."""

    def run():
        return model(x.detach().requires_grad_(True))

    return run


def capture_forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The forward the gradient attention methods (``grad_rollout``, ``transformer_attribution``) run:
    ``forward`` under :class:`AttentionCapture` (per function call; ``nn.MultiheadAttention`` per module),
    gradients on, so the fused calls are deferred (their maps are computed in the backward pass). ``rollout``
    computes the maps in its forward (without a graph): its own row measures that."""
    import backprop_hooks as bh
    from backprop_hooks.rules.attention import AttentionCapture

    multihead = any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())

    def run():
        capture = AttentionCapture()
        with bh.attach(model, [(torch.nn.MultiheadAttention, capture)] if multihead else []), capture.recording():
            return model(x.detach().requires_grad_(True))

    return run


def markdown(rows: List[dict], columns: List[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
