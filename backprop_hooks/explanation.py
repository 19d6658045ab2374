"""The result of an explanation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def upsample(m: torch.Tensor, size: Tuple[int, ...]) -> torch.Tensor:
    """Resize maps ``(B, *s)`` to ``size``: (bi/tri)linear by rank, ``align_corners=False``; identity if equal."""
    if tuple(m.shape[1:]) == tuple(size):
        return m
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(m[:, None], size=size, mode=mode, align_corners=False)[:, 0]


def to_maps(attributions: torch.Tensor, input_shape: Tuple[int, ...]) -> torch.Tensor:
    """Signed spatial maps at input resolution.

    * input-shaped ``(B, Cin, H, W)``: summed over channels;
    * a layer or token grid ``(B, h, w)``: bilinearly upsampled to ``(H, W)``;
    * non-image inputs ``(B, F)`` / ``(B, Cin, L)``: returned as ``(B, F)`` / summed to ``(B, L)``.
    """
    if len(input_shape) == 4:
        size = tuple(input_shape[-2:])
        return upsample(attributions.sum(dim=1) if attributions.dim() == 4 else attributions, size)
    if len(input_shape) == 3 and attributions.dim() == 3:
        return attributions.sum(dim=1)
    return attributions


@dataclass
class Explanation:
    """What ``bh.explain`` returns.

    ``attributions``: raw, in the method's own space (input-shaped, a layer grid (B,h,w) or a token grid);
    ``maps``: (B,H,W) signed spatial maps at input resolution (computed on first access);
    ``linear``: whether the method is linear in the seed, i.e. whether the contrast identities hold.
    """

    attributions: torch.Tensor
    logits: torch.Tensor
    classes: torch.Tensor
    method: str
    target: str
    linear: bool
    input_shape: Tuple[int, ...]
    layer: Optional[str] = None
    extras: dict = field(default_factory=dict)
    _maps: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def maps(self) -> torch.Tensor:
        if self._maps is None:
            self._maps = to_maps(self.attributions, self.input_shape)
        return self._maps

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)

    def __repr__(self) -> str:
        return (
            f"Explanation(method={self.method!r}, target={self.target!r}, linear={self.linear}, "
            f"attributions={tuple(self.attributions.shape)}, classes={self.classes.tolist()})"
        )
