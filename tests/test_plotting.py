"""Plots are checked by looking at them: each kind is rendered to PNG in memory and its pixels are read back.

What the pixels must show: a colour bar (a band running from the colour map's blue through white to its red),
red and blue on a signed map that has both signs, red alone on a map without sign, and as many panels as the
figure should have. The checks themselves fail on a blank figure and on a map drawn with another colour map.
"""

from __future__ import annotations

import sys

import pytest
import torch

import backprop_hooks as bh
from backprop_hooks import models
from backprop_hooks.errors import MissingExtraError, OptionError
from backprop_hooks.plotting import explanations as plotted
from backprop_hooks.plotting.maps import new_figure
from _pixels import blue, box, colour_bar_lines, pixels, red, square_panels

# ---- explanations to draw (no model needed) --------------------------------------------------------------

NAMES = ["zero", "one", "cat", "dog", "eel"]


def image_explanation(signs: str = "both", batch: int = 1, method: str = "gradient", **kw) -> bh.Explanation:
    """A pixel-space explanation of (batch, 3, 32, 32) images: + on the left half, - on the right ("both"),
    |value| ("none", a magnitude)."""
    attributions = torch.ones(batch, 3, 32, 32)
    attributions[..., 16:] = -1.0
    attributions *= torch.linspace(0.2, 1.0, 32)[:, None]  # varying strength
    if signs == "none":
        attributions = attributions.abs()
    logits = torch.arange(batch * 5, dtype=torch.float32).reshape(batch, 5)
    return bh.Explanation(
        attributions, logits, torch.full((batch,), 2), method, "weighted", True, (batch, 3, 32, 32), **kw
    )


def layer_explanation() -> bh.Explanation:
    """A CAM-like explanation: a signed 4x4 layer grid."""
    grid = torch.tensor([[1.0, 1.0, -1.0, -1.0]] * 4)[None]
    return bh.Explanation(grid, torch.zeros(1, 5), torch.tensor([3]), "gradcam", "logit", True, (1, 3, 32, 32), "f")


def text_explanation() -> bh.Explanation:
    scores = torch.tensor([[0.0, 2.0, -1.0, 0.5, 0.0], [1.0, -2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids = torch.arange(10).reshape(2, 5) * mask
    extras = {"input_ids": ids, "attention_mask": mask}
    return bh.Explanation(
        scores * mask, torch.zeros(2, 3), torch.tensor([0, 2]), "ixg", "weighted", True, (2, 5), **{"extras": extras}
    )


IMAGE = torch.rand(1, 32, 32).expand(3, -1, -1)  # grey: any red or blue comes from the map


# ---- the checks ------------------------------------------------------------------------------------------


def test_signed_map_shows_both_colours_and_a_colour_bar():
    fig = image_explanation("both").plot(IMAGE, class_names=NAMES)
    image = pixels(fig)
    panel = box(fig, fig.axes[0], image)
    assert red(panel) > 0.2 * panel[..., 0].size and blue(panel) > 0.2 * panel[..., 0].size
    assert colour_bar_lines(image) >= 5  # a band several pixels wide
    assert square_panels(image) == 1
    bar_label = fig.axes[-1].get_ylabel()
    assert "red: for cat (2)\nblue: against cat (2)" in bar_label and "99th percentile" in bar_label
    title = fig.axes[0].get_title()
    assert "cat (2)" in title and "weighted contrast" in title and "gradient" in fig._suptitle.get_text()


def test_unsigned_map_is_one_hue():
    """A map without sign draws [0, max] in red alone: no blue in the panel nor in the colour bar."""
    fig = image_explanation("none").plot(IMAGE)
    image = pixels(fig)
    panel, bar = box(fig, fig.axes[0], image), box(fig, fig.axes[-1], image)
    assert red(panel) > 0.3 * panel[..., 0].size and blue(panel) == 0
    assert red(bar) > 0.3 * bar[..., 0].size and blue(bar) == 0 and colour_bar_lines(image) == 0
    assert "magnitude" in fig.axes[-1].get_ylabel() and fig.axes[-1].get_ylim()[0] == 0


def test_layer_map_over_the_image_at_half_opacity():
    e = layer_explanation()
    assert plotted.method_scale(e) == (0.5, 100.0)
    fig = e.plot(IMAGE)
    image = pixels(fig)
    panel = box(fig, fig.axes[0], image)
    assert red(panel) > 0 and blue(panel) > 0 and colour_bar_lines(image) >= 5
    no_image = pixels(e.plot())  # the map alone: opaque, so fully saturated at its extremes
    assert red(no_image) > red(image)


def test_a_batch_is_a_grid_of_panels_on_one_scale():
    e = image_explanation("both", batch=5)
    e.attributions[3] *= 10  # one strong sample: the shared scale makes the others fainter
    fig = e.plot(IMAGE[None].expand(5, -1, -1, -1))
    image = pixels(fig)
    assert square_panels(image) == 5 and colour_bar_lines(image) >= 5
    assert len({tuple(im.get_clim()) for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "bwr"}) == 1
    one = e.plot(IMAGE, index=3)
    assert square_panels(pixels(one)) == 1 and "3:" not in one.axes[0].get_title()
    few = e.plot(IMAGE, max_panels=2)
    assert square_panels(pixels(few)) == 2 and "the first 2 of 5" in few._suptitle.get_text()


def test_the_checks_fail_on_a_blank_or_wrongly_coloured_figure():
    blank = new_figure(figsize=(3, 3), dpi=100)
    blank.add_subplot().axis("off")
    assert colour_bar_lines(pixels(blank)) == 0 and square_panels(pixels(blank)) == 0
    wrong = new_figure(figsize=(4, 3), dpi=100, layout="constrained")
    ax = wrong.add_subplot()
    artist = ax.imshow(image_explanation().maps[0], cmap="viridis")
    wrong.colorbar(artist, ax=ax)
    image = pixels(wrong)
    assert colour_bar_lines(image) == 0 and square_panels(image) == 1


def test_into_a_pyplot_axes():
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots()
    try:
        assert image_explanation().plot(IMAGE, ax=ax) is ax
        image = pixels(fig)
        assert red(box(fig, ax, image)) > 0 and colour_bar_lines(image) >= 5
        with pytest.raises(OptionError, match="index="):
            image_explanation(batch=2).plot(IMAGE, ax=ax)
    finally:
        plt.close(fig)


def test_token_heat_map_png_and_html():
    e = text_explanation().named(tokens=[list("abcde"), list("xyz")], class_names=["exc", "str", "num"])
    fig = e.plot()
    image = pixels(fig)
    assert red(image) > 50 and blue(image) > 50 and colour_bar_lines(image) >= 5
    texts = [t.get_text() for t in fig.texts]
    assert ["a", "b", "c", "d", "e", "x", "y", "z"] == [t for t in texts if len(t) == 1]
    assert any(t.startswith("num (2), weighted contrast · p = 0.333 · ixg") for t in texts)
    page = e._repr_html_()
    assert page.count("<span") == 8 and "rgb(255,0,0)" in page and "rgb(0,0,255)" in page and "exc (0), " in page
    assert e._repr_png_().startswith(b"\x89PNG")
    ids = text_explanation()._repr_html_()  # no tokens given: the ids
    assert ">6<" in ids and ">9<" not in ids  # padding is not shown


def test_inline_views_never_raise_and_show_one_picture():
    e = image_explanation()
    assert e._repr_png_().startswith(b"\x89PNG") and e._repr_html_() is None  # a notebook shows the PNG alone
    assert repr(e).startswith("Explanation(method='gradient'")
    tabular = bh.Explanation(
        torch.ones(2, 4), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "g", "logit", True, (2, 4)
    )
    assert tabular._repr_png_() is None and tabular._repr_html_() is None
    broken = image_explanation()
    broken.attributions = torch.ones(7)  # maps cannot be made
    assert broken._repr_png_() is None


def test_without_matplotlib_the_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"backprop_hooks\[cli\]"):
        image_explanation().plot()
    assert image_explanation()._repr_png_() is None
    assert text_explanation()._repr_html_() is not None  # the token view needs no matplotlib


@pytest.fixture(scope="module")
def digits():
    model = models.create("digits_cnn")
    x, _ = models.digits("test")
    return model, x[:1]


def test_compare_is_the_grid_and_the_tensors_behind_it(digits):
    model, x = digits
    c = bh.compare(model, x, methods=["gradcam", "gradient"], targets=["logit", "weighted"], classes=[1, 7, 4])
    assert c.maps.shape == (2, 2, 3, 32, 32) and c.classes.tolist() == [1, 7, 4]
    for i, method in enumerate(c.methods):
        for j, key in enumerate(c.targets):
            want = bh.explain(model, x.expand(3, -1, -1, -1), method, key, classes=torch.tensor([1, 7, 4])).maps
            torch.testing.assert_close(c.maps[i, j], want)
    fig = c.plot(dpi=72)
    image = pixels(fig)
    assert square_panels(image) == 3 * 2 * 3  # rows: 3 classes x 2 methods; columns: the image and 2 targets
    assert colour_bar_lines(image) >= 3
    maps = [ax for ax in fig.axes if any(im.get_cmap().name == "bwr" for im in ax.get_images())]
    assert len(maps) == 3 * 2 * 2
    colours = [(red(box(fig, ax, image)), blue(box(fig, ax, image))) for ax in maps]
    assert sum(r > 0 for r, _ in colours) >= 6 and sum(b > 0 for _, b in colours) >= 6  # signed maps
    assert c.explanations["gradcam", "weighted"].extras["class_names"] == model.class_names
    assert c._repr_png_().startswith(b"\x89PNG")
    with pytest.raises(OptionError, match="not among the methods"):
        bh.compare(model, x, methods=["gradient"], options={"gradcam": {"layer": "x"}})


def test_versus_explanations_name_the_other_class(digits):
    model, x = digits
    e = bh.explain(model, x, "gradcam", bh.targets.Versus(3), classes=5)
    assert e.extras["versus"] == 3
    fig = e.plot(x, class_names=model.class_names)
    assert "class 5 and not class 3" in fig.axes[0].get_title() and "y_{3}" in fig.axes[-1].get_ylabel()
    per_sample = bh.explain(model, x.expand(2, -1, -1, -1), "gradcam", bh.targets.Versus(torch.tensor([3, 4])), [5, 5])
    fig = per_sample.plot()
    assert ["and not class 3" in fig.axes[0].get_title(), "and not class 4" in fig.axes[1].get_title()] == [True] * 2
    assert "y_s" in fig.axes[-1].get_ylabel()


SPACES = {
    "digits_cnn": ("gradient", "fullgrad", "guided_gradcam", "gradcam"),
    "digits_vit": ("grad_rollout", "vit_gradcam"),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_scale_follows_the_command_lines_method_space(every):
    """Pixel-space maps (99th percentile, opacity by strength) exactly for the methods whose attributions live
    in input space (the command line's rule before the scale moved here), on a convolutional network and on a
    vision transformer: one method of each kind by default, every method that fits when slow."""
    from backprop_hooks.eval.catalog import applicable_methods

    steps = {"integrated_gradients": {"n_steps": 2}, "smoothgrad": {"n_samples": 2}}
    for arch, chosen in SPACES.items():
        model = models.create(arch)
        x = torch.rand(1, 3, 32, 32)
        for method in applicable_methods(model) if every else chosen:
            e = bh.explain(model, x, method, "logit", **steps.get(method, {}))
            assert plotted.is_pixel_space(e) == (bh.methods.get(method).space == "input"), (arch, method)


def test_the_command_lines_figure_is_drawn_by_the_same_module(digits):
    """``backprop-hooks explain``'s figure: a row per class, the image then a map per target, a colour bar under
    each map column (the grid of :mod:`backprop_hooks.plotting.maps`)."""
    from backprop_hooks.eval import explain as ex

    model, x = digits
    result = ex.explain_classes(model, x[0], "gradcam", ["logit", "weighted"], classes=[1, 7])
    fig = ex.figure(result, "t")
    image = pixels(fig)
    assert square_panels(image) == 2 * 3 and colour_bar_lines(image) >= 6  # two bars, several pixels each
    panels = [box(fig, fig.axes[r * 3 + j], image) for r in range(2) for j in (1, 2)]  # rows: classes 1, 7
    assert red(panels[0]) > 1000 and blue(panels[3]) > 1000  # 1 is evidence for 1; weighted: against 7
    assert red(box(fig, fig.axes[0], image)) == blue(box(fig, fig.axes[0], image)) == 0  # the image column


def test_figures_are_plain_matplotlib_figures_that_pickle():
    import pickle

    from matplotlib.figure import Figure

    fig = image_explanation().plot(IMAGE)
    assert isinstance(fig, Figure) and repr(fig).startswith("<Figure size")
    again = pickle.loads(pickle.dumps(fig))
    assert square_panels(pixels(again)) == 1
