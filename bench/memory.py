"""Peak tensor memory of one call, above what was allocated before it.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics.

CPU: there is no allocator statistic, and sampling the resident set reads about zero after the first call
(the process reuses pages it already holds). Instead the call runs once under the profiler with
``profile_memory=True``, which records every tensor allocation and free of the CPU allocator; the running
sum of those events, in time order, peaks at the call's peak tensor memory. This counts tensors only (not
Python objects or library workspaces such as oneDNN scratch), which is what the forward+backward floor and
an explanation are compared on. The profiled call is slower; only its memory is used.
"""
from __future__ import annotations

import gc
from typing import Callable, Iterable, Tuple

import torch


def peak_of_events(events: Iterable[Tuple[int, int]]) -> int:
    """Highest running sum of ``(time, bytes)`` allocation (+) and free (-) events taken in time order."""
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = prof.profiler.kineto_results.events()  # the raw events: key_averages() drops the memory ones
    return peak_of_events((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """MiB of tensor memory allocated at the peak of ``fn()`` beyond what was allocated before it."""
    gc.collect()
    if device.type == "cpu":
        return _cpu_peak_bytes(fn) / 2**20
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
