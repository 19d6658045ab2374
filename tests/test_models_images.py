"""Photos as pixel-space tensors."""

import numpy as np
import pytest
import torch
from PIL import Image

from backprop_hooks import models


def test_load_image_resizes_shorter_side_then_centre_crops(tmp_path):
    array = np.zeros((100, 200, 3), dtype=np.uint8)
    array[:, 100:] = 255  # right half white
    path = tmp_path / "half.png"
    Image.fromarray(array).save(path)
    x = models.load_image(path, 32, crop_pct=1.0)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    # 100x200 -> 32x64, crop keeps columns 16..47: the left 16 black, the right 16 white
    assert x[..., :15].max() == 0 and x[..., 17:].min() == 1


def test_load_image_accepts_grey_and_float_arrays():
    grey = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    x = models.load_image(grey, 16, crop_pct=1.0)
    assert x.shape == (1, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        models.load_image(grey * 255, 16)


def test_photos_are_bundled_rgb_in_unit_range():
    photos = models.photos()
    assert {"chelsea", "coffee", "astronaut", "rocket"} <= set(photos)
    for photo in photos.values():
        assert photo.shape == (3, 224, 224) and photo.min() >= 0 and photo.max() <= 1


def test_a_model_says_how_its_photos_are_resized():
    """``models.photos(model=...)``, ``models.load_image(..., model=...)`` and the command line's loader: one
    path, the model's ``input_size``, ``crop_pct`` and ``interpolation`` (a timm model's ``pretrained_cfg`` too)."""
    import skimage.data

    from backprop_hooks.eval.explain_files import load_source

    model = torch.nn.Identity()
    model.input_size, model.crop_pct, model.interpolation = (32, 32), 1.0, "bicubic"
    bicubic = models.load_image(skimage.data.chelsea(), 32, crop_pct=1.0, interpolation="bicubic")[0]
    assert torch.equal(models.photos(model=model)["chelsea"], bicubic)
    assert torch.equal(load_source("chelsea", model), bicubic)
    assert torch.equal(models.load_image(skimage.data.chelsea(), model=model)[0], bicubic)
    assert not torch.equal(models.photo("chelsea", 32, crop_pct=1.0), bicubic)  # the default: bilinear
    timm_like = torch.nn.Identity()
    timm_like.pretrained_cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"}
    assert torch.equal(models.photo("chelsea", model=timm_like), bicubic)
    with pytest.raises(ValueError, match="no bundled photo 'cat'"):
        models.photo("cat")
