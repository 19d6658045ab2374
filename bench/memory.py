"""Peak memory of one call on CUDA (``max_memory_allocated`` above what was allocated before).

On the CPU there is no reliable per-call figure: PyTorch's CPU allocations are served from pages the
process already holds after the first call, so sampling the resident set reads about zero. The harness
reports CPU peak memory as not measured rather than print a number that means nothing.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """MiB allocated at the peak of ``fn()`` beyond what was allocated before it; NaN off CUDA."""
    if device.type != "cuda":
        return float("nan")
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
