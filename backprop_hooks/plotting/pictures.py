"""Images to draw under a map, from the formats users have: one converter for ``Explanation.plot``, the
``bh.compare`` grid and the command line's figure.

Accepted: torch tensors and numpy arrays, (C, H, W), (H, W, C) or (H, W), a batch (B, C, H, W) / (B, H, W, C),
a PIL image or a list of images; RGBA drops its alpha. Values are read by their type and range:

* integers (``uint8`` arrays, PIL images, ``uint8`` tensors): ``v / 255`` (``v / 65535`` above 255);
* floats in [0, 1] (a little over- or undershoot from resampling is clipped): as they are;
* floats that are never negative and go above 2: the 0–255 scale, ``v / 255``;
* anything else (negative values: a normalised image, ``(v - mean) / std``): with a ``normalization``
  (``(mean, std)``, a Hugging Face image processor, a timm model or its data config) ``v * std + mean``;
  without one the image is drawn stretched to its range, ``(v - min) / (max - min)``, with an
  :class:`~backprop_hooks.errors.ImageRangeWarning` saying how to give it in [0, 1].

A batch is read as one: every image of it on the same scale, at most one warning.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..errors import ImageRangeWarning, InputError, OptionError, require

np = require("numpy", "cli")

Normalization = Tuple[Sequence[float], Sequence[float]]
SLACK = 0.05  # resampling (bicubic) overshoots [0, 1] a little: clipped without a word
CHANNELS = (1, 3, 4)


def normalization_of(source: Any) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(mean, std)`` arrays from a ``(mean, std)`` pair, an object with ``image_mean``/``image_std`` (a Hugging
    Face image processor), a mapping or object with ``mean``/``std`` (timm's data config), or a model with a
    timm ``pretrained_cfg``; None for None or a model that declares none."""
    if source is None:
        return None
    pairs = [
        (getattr(source, "image_mean", None), getattr(source, "image_std", None)),
        (_get(source, "mean"), _get(source, "std")),
        (_get(getattr(source, "pretrained_cfg", None), "mean"), _get(getattr(source, "pretrained_cfg", None), "std")),
    ]
    if isinstance(source, (tuple, list)) and len(source) == 2:
        pairs.insert(0, (source[0], source[1]))
    for mean, std in pairs:
        if mean is not None and std is not None:
            mean, std = (np.asarray(to_float(v), dtype=np.float32).reshape(-1) for v in (mean, std))
            if (std > 0).all() and mean.size == std.size:
                return mean, std
    if isinstance(source, torch.nn.Module):
        return None
    raise OptionError(
        f"normalization= takes (mean, std), an image processor (image_mean, image_std) or a timm model; "
        f"got {type(source).__name__}"
    )


def _get(source: Any, key: str) -> Any:
    return source.get(key) if isinstance(source, dict) else getattr(source, key, None)


def to_float(value: Any) -> Any:
    """A tensor as a numpy array (detached, on the CPU; integers keep their dtype, floats become float32 or
    float64), anything else unchanged."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() and value.dtype != torch.float64 else value).numpy()


def _array(image: Any) -> np.ndarray:
    """A numpy array of one image or a batch, dtype kept (a PIL image: its RGB or grey pixels)."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image, without importing PIL
        return np.asarray(image.convert("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
    if isinstance(image, (list, tuple)):
        return np.stack([_array(i) for i in image])
    return np.asarray(to_float(image))


def _channels_last(array: np.ndarray) -> np.ndarray:
    """(…, H, W, C) or (…, H, W) from (…, C, H, W) / (…, H, W, C) / (…, H, W); alpha dropped."""
    if array.ndim >= 3 and array.shape[-3] in CHANNELS and array.shape[-1] not in CHANNELS:
        array = np.moveaxis(array, -3, -1)
    if array.ndim >= 3 and array.shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim >= 3 and array.shape[-1] == 4:
        array = array[..., :3]
    return array


def _unit_range(array: np.ndarray, normalization: Any) -> np.ndarray:
    """``array`` (float, channels last) on [0, 1], read as the module docstring says."""
    finite = array[np.isfinite(array)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= -SLACK and hi <= 1 + SLACK:
        return array
    if lo >= -SLACK and 2 < hi <= 255 + SLACK:
        return array / 255.0
    declared = normalization_of(normalization)
    if declared is not None:
        mean, std = declared
        channels = array.shape[-1] if array.ndim >= 3 else 1
        if mean.size not in (1, channels):
            raise OptionError(f"normalization has {mean.size} channels, the image {channels}")
        undone = array * std + mean if array.ndim >= 3 else array * std[0] + mean[0]
        if float(np.nanmin(undone)) >= -0.1 and float(np.nanmax(undone)) <= 1.1:
            return undone
        advice = "the given normalization does not bring it to [0, 1]"
    else:
        advice = (
            "it looks normalised: pass it in [0, 1] (x * std + mean), or normalization=(mean, std) "
            "(or the image processor) to undo it"
        )
    mean = float(finite.mean()) if finite.size else 0.0
    warnings.warn(
        f"image values lie in [{lo:.3g}, {hi:.3g}] (mean {mean:.2g}), not in [0, 1] or 0-255: {advice}; "
        "drawn stretched to its range",
        ImageRangeWarning,
        stacklevel=4,
    )
    return (array - lo) / (hi - lo if hi > lo else 1.0)


def to_pictures(images: Any, normalization: Any = None) -> np.ndarray:
    """(N, H, W, 3) or (N, H, W) floats in [0, 1] from one image (N = 1) or a batch, in any accepted format."""
    array = _array(images)
    if array.dtype == object or array.ndim < 2:
        raise InputError(f"cannot draw an image of type {type(images).__name__} and shape {array.shape}")
    array = _channels_last(array)
    batch = array.ndim == 4 or (array.ndim == 3 and array.shape[-1] not in CHANNELS)
    array = array if batch else array[None]
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] != 3):
        raise InputError(
            f"expected an image of shape (C, H, W), (H, W, C) or (H, W), or a batch of them; got {_array(images).shape}"
        )
    if array.dtype == bool:
        array = array.astype(np.float32)
    elif array.dtype.kind in "iu":
        array = array.astype(np.float32) / (255.0 if array.max(initial=0) <= 255 else 65535.0)
    else:
        array = _unit_range(array.astype(np.float32), normalization)
    return np.clip(np.nan_to_num(array), 0.0, 1.0)


def to_picture(image: Any, normalization: Any = None) -> np.ndarray:
    """One (H, W, 3) or (H, W) image in [0, 1] (see :func:`to_pictures`)."""
    pictures = to_pictures(image, normalization)
    if pictures.shape[0] != 1:
        raise InputError(f"expected one image, got a batch of {pictures.shape[0]}")
    return pictures[0]


def per_sample(image: Any, batch: int, size: Tuple[int, int], normalization: Any = None) -> Optional[List[np.ndarray]]:
    """One picture per sample of a batch of ``batch`` maps of ``size`` (H, W): ``image`` holds one image (for
    every sample) or ``batch`` of them; None for no image."""
    if image is None:
        return None
    pictures = to_pictures(image, normalization)
    if pictures.shape[0] not in (1, batch):
        raise InputError(f"image holds {pictures.shape[0]} images for an explanation of {batch}")
    if tuple(pictures.shape[1:3]) != tuple(size):
        raise InputError(f"image of size {tuple(pictures.shape[1:3])} does not match the maps' size {tuple(size)}")
    return [pictures[min(i, pictures.shape[0] - 1)] for i in range(batch)]


def one_image(pictures: Optional[Sequence[np.ndarray]]) -> bool:
    """Whether every picture is the same image (one image explained for several classes)."""
    return pictures is not None and all(p is pictures[0] or np.array_equal(p, pictures[0]) for p in pictures)
