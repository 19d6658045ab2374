"""Peak tensor memory of one call, above what was allocated before it.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics.

CPU: there is no allocator statistic, and sampling the resident set reads about zero after the first call
(the process reuses pages it already holds). Instead the call runs once under the profiler with
``profile_memory=True``, which records every tensor allocation and free of the CPU allocator with its
address; the running sum of the call's own allocations and of the frees of those blocks, in time order,
peaks at the call's peak tensor memory. This counts tensors only (not
Python objects or library workspaces such as oneDNN scratch), which is what the forward+backward floor and
an explanation are compared on. The profiled call is slower; only its memory is used. The profiler's C++
side prints a line at each start and stop (``USDT ... profiler_start``) and a warning about blocks allocated
before it started, straight to the file descriptor: :func:`native_stderr_silenced` drops them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import warnings
from typing import Callable, Iterable, Iterator, Tuple

import torch

from .timing import steady_allocator


def peak_of_events(events: Iterable[Tuple[int, int, int]]) -> int:
    """Highest running sum of ``(time, address, bytes)`` allocation (+) and free (-) events in time order,
    counting only frees of blocks allocated among these events (a free of an older block, e.g. the previous
    call's results, would otherwise pull the sum below what this call holds)."""
    live: set = set()
    current = peak = 0
    for _, address, nbytes in sorted(events, key=lambda e: e[0]):
        if nbytes > 0:
            live.add(address)
        elif address in live:
            live.discard(address)
        else:
            continue
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points to the null device inside (what C++ writes there is dropped: the profiler's
    ``USDT`` lines, the allocator's warning); Python's ``sys.stderr`` is flushed before and after."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # allocation events sit anywhere in the tree of ops
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].ptr, node.typed[1].alloc_size))
    return peak_of_events(events)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """MiB of tensor memory allocated at the peak of ``fn()`` beyond what was allocated before it."""
    steady_allocator()  # the timings beside this measurement must not depend on it (bench/timing.py)
    gc.collect()
    if device.type == "cpu":
        try:
            return _cpu_peak_bytes(fn) / 2**20
        except (ImportError, AttributeError) as e:  # the profiler's event tree is not public API: say so, go on
            warnings.warn(f"CPU peak memory not measured: this torch's profiler lacks what bench/memory.py reads ({e})")
            return float("nan")
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
