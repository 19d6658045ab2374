"""`Normalized`: a wrapper that puts the input normalisation inside the model's forward."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """Runs `model((x - mean) / std)` on pixel-space input `x` of shape (B, C, H, W) in [0, 1].

    The inner network is the submodule `model`, so its layers are named `"model.<name>"` on the wrapper.
    `mean` and `std` are non-persistent buffers: they follow `.to(device)` but stay out of `state_dict()`.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"expected pixel-space images of shape (B, {self.mean.shape[1]}, H, W) in [0, 1], "
                f"got shape {tuple(x.shape)}"
            )
        return self.model((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        mean = tuple(round(v, 4) for v in self.mean.flatten().tolist())
        std = tuple(round(v, 4) for v in self.std.flatten().tolist())
        return f"mean={mean}, std={std}"
