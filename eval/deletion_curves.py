"""The mechanics every deletion check shares (:mod:`backprop_hooks.eval.deletion`): which units each fraction
removes, the area between two curves, and what a model's check has to say (:class:`Task`)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

ORDERS = (("attnlrp", "weighted"), ("attnlrp", "logit"), ("input_x_gradient", "logit"))


def removal_masks(scores: torch.Tensor, units: torch.Tensor, fractions: Sequence[float]) -> torch.Tensor:
    """(F, B, K) bool: the units removed at each fraction, highest ``scores`` first. ``units`` (B, K) marks the
    removable units; sample b loses ``round(f · units[b].sum())`` of them (ties broken by position)."""
    ranked = scores.masked_fill(~units, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(scores.shape[1]).expand_as(ranked))
    counts = units.sum(1)
    k = torch.stack([torch.round(f * counts.double()).long() for f in fractions])  # (F, B)
    return (rank[None] < k[:, :, None]) & units[None]


def area_between(curve: torch.Tensor, reference: torch.Tensor, fractions: Sequence[float]) -> torch.Tensor:
    """Per sample ``∫ (reference − curve) df`` by the trapezoid rule; curves are (F, B)."""
    f = torch.tensor(list(fractions), dtype=torch.float64)
    return torch.trapezoid((reference - curve).double().T, f, dim=1)


class Task:
    """What differs between the models: data, relevance per unit, the perturbed forward, the report's extras."""

    name: str
    units_name: str
    quantity, curve_name = "log-odds of t", "log-odds"
    orders: Sequence[Tuple[str, str]] = ORDERS

    def relevance(self, method: str, target: str) -> torch.Tensor:
        """(B, K) per-unit relevance of ``method`` for ``target`` and the predicted classes."""
        raise NotImplementedError

    def curve(self, removed: torch.Tensor) -> torch.Tensor:
        """(F, B) log-odds of the predicted classes with the units of ``removed`` (F, B, K) taken out."""
        raise NotImplementedError

    def panels(self) -> Optional[Dict[str, List[str]]]:
        """The orders drawn together in one panel each (None: all in one)."""
        return None

    def summary(self, curves: Dict[str, torch.Tensor], fractions: Sequence[float]) -> Tuple[str, Dict]:
        """More of the report (Markdown, JSON) beyond the table of orders."""
        return "", {}
