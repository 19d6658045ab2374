"""The pieces an LRP rule is declared from: parameter modifiers, terms and groups of terms, the stabiliser
and the sign masks (the formula is in :mod:`backprop_hooks.rules.lrp`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

Tensor = torch.Tensor
Modifier = Callable[[Tensor], Tensor]
Stabiliser = Union[float, Callable[[Tensor], Tensor]]


# -- parameter modifiers (named functions, so that rule reprs stay readable) ---------------------------
def keep(p: Tensor) -> Tensor:
    return p


def positive(p: Tensor) -> Tensor:
    return p.clamp(min=0)


def negative(p: Tensor) -> Tensor:
    return p.clamp(max=0)


def square(p: Tensor) -> Tensor:
    return p * p


def ones(p: Tensor) -> Tensor:
    return torch.ones_like(p)


def add_gamma(p: Tensor, gamma: float, part: Modifier) -> Tensor:
    """``p + γ · part(p)`` (the Gamma rule's modifier)."""
    return p + gamma * part(p)


def stabilise(z: Tensor, epsilon: Stabiliser) -> Tensor:
    """``z + ε·sign(z)``, ``sign(0) = +1`` (also for ``−0.0``); a callable ``epsilon`` is applied to ``z`` instead."""
    if callable(epsilon):
        return epsilon(z)
    out = z + 0.0  # −0.0 + 0.0 = +0.0: the sign taken below is +1 at either zero
    torch.copysign(torch.tensor(epsilon, dtype=z.dtype, device=z.device), out, out=out)  # ±ε, no mask built
    return out.add_(z)


def positive_part_mask(t: Tensor) -> Tensor:
    """``1[t > 0]`` as ``t``'s dtype (from ``sign``: one pass, no boolean tensor)."""
    return torch.sign(t).clamp_(min=0)


def negative_part_mask(t: Tensor) -> Tensor:
    """``1[t < 0]`` as ``t``'s dtype."""
    return torch.sign(t).neg_().clamp_(min=0)


def has_negative(x: Tensor) -> Callable[[], bool]:
    """Whether ``x`` has a negative entry, computed now (one reduction) and read later on the host: on CUDA the
    flag is copied without blocking and read once the device got there, so the backward pass never waits."""
    if x.numel() == 0:
        return lambda: False
    flag = torch.amin(x.detach()) < 0
    if flag.device.type != "cuda":
        return lambda: bool(flag)
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> bool:
        done.synchronize()
        return bool(host)

    return read


@dataclass(frozen=True)
class Term:
    """One term: input ``"x"``, ``"pos"`` (x⁺), ``"neg"`` (x⁻), ``"ones"``, ``"low"`` or ``"high"``;
    weight and bias modifiers (``bias=None``: no bias); ``sign`` in the denominator and the reduction."""

    input: str
    weight: Modifier = keep
    bias: Optional[Modifier] = keep
    sign: float = 1.0


@dataclass(frozen=True)
class Group:
    """Terms sharing one denominator; ``where="pos"|"neg"`` keeps only outputs with ``z>0`` / ``z<0``."""

    terms: Tuple[Term, ...]
    scale: float = 1.0
    where: Optional[str] = None


__all__ = [
    "Modifier",
    "Stabiliser",
    "keep",
    "positive",
    "negative",
    "square",
    "ones",
    "add_gamma",
    "stabilise",
    "positive_part_mask",
    "negative_part_mask",
    "has_negative",
    "Term",
    "Group",
]
