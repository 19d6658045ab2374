"""Loading real photos as pixel-space tensors with a model's resize-and-centre-crop preprocessing."""

from __future__ import annotations

import math
import os
import warnings
from typing import Union

import numpy as np
import torch
from PIL import Image

from backprop_hooks.errors import ImageUpsampledWarning

ImageSource = Union[str, os.PathLike, np.ndarray, Image.Image]

# Photos bundled with scikit-image (no download), by name -> skimage.data function name.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    """An 8-bit image with the brightness a photo viewer shows for 16-bit, 32-bit integer and float modes.

    PIL's ``convert("RGB")`` clips such images (a 16-bit PNG turns white, a float TIFF in [0, 1] black).
    Integer images are read on their bit depth's scale (16 bits unless a value needs more); float images
    on [0, 1] when they lie in it, else on [0, 255]."""
    array = np.asarray(image)
    if image.mode == "F" or array.dtype.kind == "f":
        array = np.nan_to_num(array.astype(np.float64))
        top = 1.0 if array.min() >= 0 and array.max() <= 1 else 255.0
    else:
        array = array.astype(np.float64)
        top = 255.0 if array.max() <= 255 and image.mode in ("L", "P") else 65535.0
        if array.max() > 65535:
            top = float(2**32 - 1)
    return Image.fromarray(np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, as a photo viewer shows it: EXIF orientation applied, 16-bit and float images
    scaled (not clipped), transparency composited on white."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _scaled_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path`` as 8-bit RGB, as a photo viewer shows it (see :func:`to_rgb`); also the
    loader of the folder data sets."""
    with Image.open(path) as opened:
        opened.load()
        return to_rgb(opened)


def _to_pil(image: ImageSource) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return open_rgb(image)
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


def _describe(image: ImageSource) -> str:
    return repr(str(image)) if isinstance(image, (str, os.PathLike)) else "array"


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
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    pil = _to_pil(image)
    resize = math.floor(size / crop_pct)
    if min(pil.size) < min(size, resize):
        warnings.warn(
            f"image {_describe(image)} is {pil.size[0]}x{pil.size[1]} px, smaller than the model's {size} px "
            f"input: it is upsampled {resize / min(pil.size):.1f}x, so its maps show interpolated detail",
            ImageUpsampledWarning,
            stacklevel=2,
        )
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
