"""The scikit-learn digits data set (1797 grey 8x8 images of the digits 0-9) as pixel-space tensors.

Split: `sklearn.model_selection.train_test_split(test_size=0.25, stratify=labels, random_state=0)`, which
gives 1347 training and 450 test images. Each 8x8 image (values 0..16) is divided by 16, upsampled
bilinearly (align_corners=False) to `size` x `size` and repeated over 3 channels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "test")
TEST_FRACTION = 0.25
SPLIT_SEED = 0
CLASS_NAMES = [str(d) for d in range(10)]


@lru_cache(maxsize=None)
def _split_indices() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def digits(split: str = "test", size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, size, size) float32 in [0, 1] and labels (N,) int64 of one split ("train" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    if size < 8:
        raise ValueError(f"size must be at least 8 (the original resolution), got {size}")
    from sklearn.datasets import load_digits

    data = load_digits()
    index = _split_indices()[split]
    images = torch.from_numpy(data.images[index]).float().div_(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    labels = torch.from_numpy(data.target[index]).long()
    return images.repeat(1, 3, 1, 1).contiguous(), labels
