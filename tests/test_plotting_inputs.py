"""What a user hands a plot and what they see, checked on rendered pixels: images in the formats users have
(uint8, PIL, 0-255, normalised), which panels share a colour scale, colour bars that stay in their place."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import backprop_hooks as bh
from backprop_hooks import models
from backprop_hooks.api import Comparison
from backprop_hooks.errors import ImageRangeWarning, OptionError
from _pixels import blue, box, pixels, red

CAT = models.photo("chelsea", 32, crop_pct=1.0)  # (3, 32, 32) floats in [0, 1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's
NORMALISED = (CAT - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
UINT8 = (CAT.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (32, 32, 3)


def grid_explanation(strengths=(1.0,), target: str = "logit", sign: str = "both") -> bh.Explanation:
    """A CAM-like explanation of a batch: a 4x4 grid, + on the left and - on the right, times each strength."""
    grid = torch.tensor([[1.0, 1.0, -1.0, -1.0]] * 4)
    grid = grid.abs() if sign == "none" else grid
    attributions = torch.stack([s * grid for s in strengths])
    batch = len(strengths)
    logits = torch.arange(batch * 5, dtype=torch.float32).reshape(batch, 5)
    classes = torch.full((batch,), 2)
    return bh.Explanation(attributions, logits, classes, "gradcam", target, True, (batch, 3, 32, 32), "f")


def image_panel(image, **options) -> np.ndarray:
    """The pixels of the one panel of a plot of ``image`` with the map made invisible (``alpha=0``)."""
    fig = grid_explanation().plot(image, alpha=0.0, **options)
    return box(fig, fig.axes[0], pixels(fig))


# ---- images in the formats users have ---------------------------------------------------------------------

FORMATS = {
    "uint8 (H, W, 3) array": lambda: UINT8,
    "uint8 (3, H, W) array": lambda: UINT8.transpose(2, 0, 1),
    "uint8 tensor": lambda: torch.from_numpy(UINT8).permute(2, 0, 1),
    "0-255 float tensor": lambda: CAT * 255,
    "PIL image": lambda: Image.fromarray(UINT8),
    "float (H, W, 3) array in [0, 1]": lambda: CAT.permute(1, 2, 0).numpy(),
    "bfloat16 tensor": lambda: CAT.bfloat16(),
}


@pytest.mark.parametrize("kind", FORMATS)
def test_images_in_the_formats_users_have_draw_the_photo(kind):
    reference = image_panel(CAT)
    assert reference.mean() < 200  # the photo, not a white background
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageRangeWarning)  # none of these is ambiguous
        drawn = image_panel(FORMATS[kind]())
    assert np.abs(drawn - reference).max() <= 3, kind  # uint8 rounding at most


def test_a_normalised_image_is_undone_or_said():
    reference = image_panel(CAT)
    with pytest.warns(ImageRangeWarning, match=r"looks normalised.*normalization=\(mean, std\)"):
        stretched = image_panel(NORMALISED)
    assert stretched.mean() < 200 and np.abs(stretched - reference).mean() < 40  # a photo, roughly
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageRangeWarning)
        undone = image_panel(NORMALISED, normalization=(MEAN, STD))
        processor = types.SimpleNamespace(image_mean=MEAN, image_std=STD)  # as a Hugging Face image processor
        by_processor = image_panel(NORMALISED, normalization=processor)
    assert np.abs(undone - reference).max() <= 2 and np.abs(by_processor - reference).max() <= 2
    with pytest.raises(OptionError, match="normalization="):
        image_panel(NORMALISED, normalization="imagenet")


class NormalisedInputNet(torch.nn.Module):
    """A model that takes normalised images and declares it, as timm models do (``pretrained_cfg``)."""

    pretrained_cfg = {"mean": tuple(MEAN), "std": tuple(STD)}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4, 5)
        self.eval()

    def forward(self, x):
        return self.head(self.conv(x).relu().mean((2, 3)))


def test_compare_draws_the_models_normalised_input_as_the_photo():
    c = bh.compare(NormalisedInputNet(), NORMALISED[None], methods=["gradient"], targets=["logit"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageRangeWarning)
        fig = c.plot(dpi=72)  # the model declares its normalisation: undone
        by_uint8 = c.plot(image=UINT8, dpi=72)
    reference = c.plot(image=CAT, dpi=72)
    photos = [box(f, f.axes[0], pixels(f)) for f in (fig, by_uint8, reference)]
    assert photos[2].mean() < 200
    assert np.abs(photos[0] - photos[2]).max() <= 3 and np.abs(photos[1] - photos[2]).max() <= 3


# ---- which panels share a scale -----------------------------------------------------------------------------


def reds(fig) -> list:
    """Red pixels in each map panel of ``fig`` (the axes holding a colour map's image)."""
    image = pixels(fig)
    maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and len(ax.get_images()) >= 2]
    return [red(box(fig, ax, image)) for ax in maps]


def test_a_weak_map_next_to_a_strong_one_is_visible_on_its_own_scale():
    """Two images, one map 10 times weaker (the cat next to the espresso): drawn per panel by default."""
    e = grid_explanation((1.0, 0.1))
    two = torch.stack([CAT, CAT.flip(-1)])
    strong, weak = reds(e.plot(two))
    assert weak > 0.8 * strong > 0
    fig = e.plot(two)
    assert "±0.1" in fig.axes[1].get_title() and "each panel" in fig.axes[-1].get_ylabel()
    strong, weak = reds(e.plot(two, scale="shared"))
    assert weak < 0.2 * strong
    assert "one for all panels" in e.plot(two, scale="shared").axes[-1].get_ylabel()
    same = e.plot(CAT)  # one image explained twice (two classes): one scale, the classes compare
    assert len({im.get_clim() for ax in same.axes for im in ax.get_images()[1:]}) == 1
    with pytest.raises(OptionError, match="'panel', 'shared'"):
        e.plot(two, scale="column")


def comparison(strengths, images) -> Comparison:
    """A gradcam comparison of logit and weighted (the weighted maps a fifth of the logit's) made by hand."""
    explanations = {
        ("gradcam", "logit"): grid_explanation(strengths, "logit"),
        ("gradcam", "weighted"): grid_explanation([0.2 * s for s in strengths], "weighted"),
    }
    return Comparison(explanations, ["gradcam"], ["logit", "weighted"], images)


def test_compare_scales_panels_of_different_images_apart():
    c = comparison((1.0, 0.1), torch.stack([CAT, CAT.flip(-1)]))
    logit_strong, weighted_strong, logit_weak, weighted_weak = reds(c.plot(dpi=72))  # default: each panel
    assert min(logit_strong, weighted_strong, logit_weak, weighted_weak) > 0.8 * max(logit_strong, weighted_strong)
    logit_strong, _, logit_weak, _ = reds(c.plot(scale="column", dpi=72))  # the rows compare
    assert logit_weak < 0.2 * logit_strong
    logit, weighted, _, _ = reds(c.plot(scale="row", dpi=72))  # logit and weighted compare
    assert weighted < 0.4 * logit
    assert "'row'" in c.plot(scale="row", dpi=72).axes[-1].get_xlabel()
    one = comparison((1.0, 0.1), CAT[None].expand(2, -1, -1, -1))  # one image, two classes: the column shares
    logit_strong, _, logit_weak, _ = reds(one.plot(dpi=72))
    assert logit_weak < 0.2 * logit_strong and "'column'" in one.plot(dpi=72).axes[-1].get_xlabel()
    with pytest.raises(OptionError, match="'column', 'row', 'panel'"):
        c.plot(scale="shared")


# ---- colour bars -------------------------------------------------------------------------------------------


def test_a_comparison_without_sign_has_no_blue_bar():
    explanations = {("rollout", "logit"): grid_explanation((1.0,), sign="none")}
    fig = Comparison(explanations, ["rollout"], ["logit"], CAT[None]).plot(dpi=200)
    image = pixels(fig)
    bar = box(fig, fig.axes[-1], image)
    assert red(bar) > 0.3 * bar[..., 0].size and blue(bar) == 0


def test_forty_images_keep_a_thin_colour_bar():
    e = grid_explanation([1.0] * 40)
    fig = e.plot(CAT, max_panels=40, panel_size=1.0, dpi=40)
    pixels(fig)  # lays the figure out
    bar = fig.axes[-1].get_window_extent()
    assert bar.width / fig.dpi <= 0.2 and bar.height / fig.dpi <= 4.5  # inches


@pytest.mark.parametrize("layout", [None, "constrained"])
def test_a_colour_bar_in_a_users_subplots_stays_in_its_panel(layout):
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 3, layout=layout)
    try:
        e = grid_explanation((1.0, 0.5, 0.2))
        for i, ax in enumerate(axes):
            e.plot(torch.stack([CAT] * 3), ax=ax, index=i)
        image = pixels(fig)
        renderer = fig.canvas.get_renderer()
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == 3
        for i, bar in enumerate(bars[:2]):
            reach = bar.get_tightbbox(renderer)  # the bar with its ticks and label
            neighbour = axes[i + 1].get_window_extent()
            assert reach.x1 < neighbour.x0, (i, reach, neighbour)
            region = box(fig, bar, image)
            assert red(region) > 0 and blue(region) > 0
    finally:
        plt.close(fig)
