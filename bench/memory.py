"""Peak memory of one call: CUDA's allocator counter, or on the CPU the process's resident set sampled
every millisecond by a thread (large tensors are returned to the OS when freed, so RSS follows them)."""
from __future__ import annotations

import gc
import os
import threading
import time
from typing import Callable

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return float("nan")
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = fn()
    peak[0] = max(peak[0], _rss())
    done.set()
    thread.join()
    del result
    return (peak[0] - base) / 2**20
