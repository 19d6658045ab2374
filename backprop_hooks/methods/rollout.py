r"""The rollout core shared by ``rollout``, ``grad_rollout`` and ``transformer_attribution``.

Per layer ``l`` a method provides a token-mixing matrix ``M_l`` (B, N, N) (rows: output tokens, columns:
input tokens). The rollout accounts for the residual connection and multiplies over layers, first layer
on the right:

    Â_l = (M_l + I)/2  (``residual="average"``, Abnar & Zuidema)  or  M_l + I  (``"add"``, Chefer et al.)
    Â_l ← Â_l / Σ_j |Â_l[:, j]|   (``normalize=True``: rows of unit ℓ1 norm, i.e. summing to 1 when ≥ 0)
    R = Â_L ⋯ Â_2 Â_1.

``rollout(..., rows=r)`` returns ``r R`` as a chain of vector-matrix products (O(L·N²) instead of O(L·N³)),
which is all a read-out of the class token needs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import LayerError, OptionError
from ..precision import accumulation_dtype, widen

HEAD_FUSIONS = ("mean", "max", "min")
RESIDUALS = ("average", "add")


def check_options(head_fusion: str, discard_ratio: float) -> None:
    """Raise ``OptionError`` for an unknown head fusion or a discard ratio outside [0, 1)."""
    if head_fusion not in HEAD_FUSIONS:
        raise OptionError(f"unknown head fusion {head_fusion!r}; accepted: {', '.join(map(repr, HEAD_FUSIONS))}")
    if not 0.0 <= discard_ratio < 1.0:
        raise OptionError(f"discard_ratio must be in [0, 1), got {discard_ratio}")


def fuse_heads(a: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N) by the mean, max or min over heads (in float32 for half-precision maps)."""
    check_options(how, 0.0)
    if how == "mean":
        return a.mean(dim=1, dtype=accumulation_dtype(a.dtype))
    return widen(a.amax(dim=1) if how == "max" else a.amin(dim=1))


def discard(m: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the fraction ``ratio`` of each sample's entries of smallest magnitude (diagonal kept)."""
    check_options("mean", ratio)
    b, n, _ = m.shape
    k = int(ratio * n * n)
    if k == 0:
        return m
    eye = torch.eye(n, dtype=torch.bool, device=m.device)
    magnitude = m.abs().masked_fill(eye, float("inf")).flatten(1)
    drop = magnitude.topk(k, dim=1, largest=False).indices
    return m.flatten(1).scatter(1, drop, 0.0).view(b, n, n)


def with_residual(m: torch.Tensor, residual: str = "average", normalize: bool = True) -> torch.Tensor:
    """``Â = (M + I)/2`` or ``M + I``, rows optionally normalised to unit ℓ1 norm."""
    if residual not in RESIDUALS:
        raise OptionError(f"unknown residual {residual!r}; accepted: {', '.join(map(repr, RESIDUALS))}")
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    out = (m + eye) / 2 if residual == "average" else m + eye
    if normalize:
        out = out / out.abs().sum(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out


def rollout(
    mats: Sequence[torch.Tensor], residual: str = "average", normalize: bool = True, rows: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``R = Â_L ⋯ Â_1`` (B, N, N) from layer matrices in forward order; with ``rows`` (B, k, N): ``rows R``."""
    if not mats:
        raise LayerError("rollout needs at least one layer")
    out = rows
    for m in reversed(mats):
        a = with_residual(m, residual, normalize)
        out = a if out is None else out @ a
    return out
