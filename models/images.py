"""Loading real photos as pixel-space tensors with a model's resize-and-centre-crop preprocessing."""

from __future__ import annotations

import math
import os
from typing import Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

ImageSource = Union[str, os.PathLike, np.ndarray, Image.Image]

# Photos bundled with scikit-image (no download), by name -> skimage.data function name.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def _to_pil(image: ImageSource) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 1:
            raise ValueError("a non-uint8 image array must hold values in [0, 1]")
        array = np.round(array * 255.0).astype(np.uint8)
    return Image.fromarray(array[..., :3])


def load_image(
    image: ImageSource, size: int = 224, *, crop_pct: float = 0.875, interpolation: str = "bilinear"
) -> torch.Tensor:
    """A (1, 3, size, size) float tensor in [0, 1]: resize the shorter side to floor(size / crop_pct), centre-crop.

    `image` is a path, a PIL image, or an array (H, W[, 3|4], uint8 or float in [0, 1]). The defaults are
    the ImageNet evaluation protocol (Resize(256) -> CenterCrop(224)); a model built by `models.create`
    carries its own `crop_pct` and `interpolation` attributes.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}")
    pil = _to_pil(image)
    mode = InterpolationMode(interpolation)
    pil = TF.resize(pil, math.floor(size / crop_pct), interpolation=mode)
    pil = TF.center_crop(pil, [size, size])
    return TF.to_tensor(pil).unsqueeze(0)


def photos(size: int = 224, *, crop_pct: float = 0.875, interpolation: str = "bilinear") -> dict[str, torch.Tensor]:
    """The colour photos bundled with scikit-image, name -> (3, size, size) tensor in [0, 1].

    chelsea (a tabby cat), coffee (an espresso cup), astronaut (Eileen Collins), rocket (a launch).
    """
    import skimage.data

    return {
        name: load_image(getattr(skimage.data, name)(), size, crop_pct=crop_pct, interpolation=interpolation)[0]
        for name in PHOTOS
    }
