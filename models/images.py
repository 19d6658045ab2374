"""Loading real photos as pixel-space tensors with a model's resize-and-centre-crop preprocessing."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from backprop_hooks.errors import ImageUpsampledWarning, UnknownNameError, choices

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


def preprocessing(
    model: Optional[nn.Module] = None,
    size: Optional[int] = None,
    crop_pct: Optional[float] = None,
    interpolation: Optional[str] = None,
) -> Tuple[int, float, str]:
    """``(size, crop_pct, interpolation)``: the ones given, else the model's (a model of `models.create`
    carries `input_size`, `crop_pct` and `interpolation`; a timm model its `pretrained_cfg`), else the
    ImageNet evaluation protocol (224, 0.875, bilinear: Resize(256) -> CenterCrop(224))."""
    cfg = getattr(model, "pretrained_cfg", None) if model is not None else None
    cfg = cfg if isinstance(cfg, dict) else {}
    declared_size = getattr(model, "input_size", None) or cfg.get("input_size", (224,))[-2:]
    size = size if size is not None else int(tuple(declared_size)[0])
    crop_pct = crop_pct if crop_pct is not None else getattr(model, "crop_pct", cfg.get("crop_pct", 0.875))
    interpolation = interpolation or getattr(model, "interpolation", cfg.get("interpolation", "bilinear"))
    return size, float(crop_pct), str(interpolation)


def load_image(
    image: ImageSource,
    size: Optional[int] = None,
    *,
    crop_pct: Optional[float] = None,
    interpolation: Optional[str] = None,
    model: Optional[nn.Module] = None,
) -> torch.Tensor:
    """A (1, 3, size, size) float tensor in [0, 1]: resize the shorter side to floor(size / crop_pct), centre-crop.

    `image` is a path, a PIL image, or an array (H, W[, 3|4], uint8 or float in [0, 1]). `model=`: resize as
    that model's training data was (a model of `models.create` carries its `input_size`, `crop_pct` and
    `interpolation`: bicubic for timm's EfficientNets, bilinear for torchvision's weights); the command line
    loads its images this way. Without a model: the ImageNet evaluation protocol (224 px, Resize(256) ->
    CenterCrop(224), bilinear). Given `size`, `crop_pct`, `interpolation` win.
    """
    size, crop_pct, interpolation = preprocessing(model, size, crop_pct, interpolation)
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


def photo(name: str, size: Optional[int] = None, **options: Any) -> torch.Tensor:
    """One bundled photo (see :func:`photos`) as a (3, size, size) tensor in [0, 1], loaded by
    :func:`load_image` (``model=``, ``crop_pct=``, ``interpolation=``); the command line's photos too."""
    import skimage.data

    if name not in PHOTOS:
        raise UnknownNameError(f"no bundled photo {name!r}; the photos are {choices(PHOTOS)}")
    return load_image(getattr(skimage.data, name)(), size, **options)[0]


def photos(size: Optional[int] = None, **options: Any) -> dict[str, torch.Tensor]:
    """The colour photos bundled with scikit-image, name -> (3, size, size) tensor in [0, 1].

    chelsea (a tabby cat), coffee (an espresso cup), astronaut (Eileen Collins), rocket (a launch).
    ``photos(model=model)`` resizes them as the model's training data was, as ``backprop-hooks explain``
    does (see :func:`load_image`); ``crop_pct=``, ``interpolation=`` set them by hand.
    """
    return {name: photo(name, size, **options) for name in PHOTOS}
