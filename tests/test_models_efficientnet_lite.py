"""The bundled EfficientNet-Lite0: weight mapping and predictions on real photos."""

import pytest
import torch

from backprop_hooks import models
from backprop_hooks.models import efficientnet_lite
from backprop_hooks.errors import WeightsMismatchError
from backprop_hooks.models.weights import map_in_order

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def lite0():
    return models.create("efficientnet_lite0")


@pytest.fixture(scope="module")
def photo_batch(lite0):
    photos = models.photos(224, crop_pct=lite0.crop_pct, interpolation=lite0.interpolation)
    return torch.stack([photos["chelsea"], photos["coffee"]])


def test_every_package_tensor_maps_onto_timm_with_equal_shape():
    source = efficientnet_lite.package_state_dict()
    target = efficientnet_lite.build().state_dict()
    mapped = efficientnet_lite.timm_state_dict(source)
    assert len(source) == len(target) == len(mapped) == 296
    assert list(mapped) == list(target)
    for (key, tensor), reference, original in zip(mapped.items(), target.values(), source.values()):
        assert tensor.shape == reference.shape, key
        assert tensor is original


def test_mapping_rejects_wrong_counts_and_shapes():
    target = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(WeightsMismatchError, match="1 source tensors vs 2"):
        map_in_order({"x": torch.zeros(2)}, target, "test")
    with pytest.raises(WeightsMismatchError, match=r"y \(4,\) cannot map to b \(3,\)"):
        map_in_order({"x": torch.zeros(2), "y": torch.zeros(4)}, target, "test")


def test_preprocessing_is_timms_for_tf_efficientnet_lite0(lite0):
    assert lite0.input_size == (224, 224)
    assert lite0.crop_pct == 0.875 and lite0.interpolation == "bicubic"
    assert lite0.mean.flatten().tolist() == [0.5] * 3 and lite0.std.flatten().tolist() == [0.5] * 3


def test_real_photos_are_classified(lite0, photo_batch):
    with torch.no_grad():
        top = lite0(photo_batch).argmax(dim=1).tolist()
    assert top[0] in CATS, lite0.class_names[top[0]]
    assert top[1] in COFFEE, lite0.class_names[top[1]]


def test_default_layer_is_last_spatial_map_and_gradcam_finds_the_cat(lite0, photo_batch):
    layer = lite0.get_submodule(lite0.default_layer)
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.update(a=o))
    try:
        x = photo_batch[:1]
        logits = lite0(x)
        (grad,) = torch.autograd.grad(logits[0, logits[0].argmax()], captured["a"])
    finally:
        handle.remove()
    activation = captured["a"]
    assert activation.shape == (1, 1280, 7, 7)
    cam = (grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1)[0]
    # chelsea's head fills the centre and left of the crop; the right border is background
    assert cam[1:6, 1:5].mean() > cam[:, 6].mean()


def test_the_readme_and_the_command_line_see_the_same_cat(lite0):
    """``models.photos(model=model)`` (the README) and ``backprop-hooks explain`` load the photo alike, with the
    model's own resize (timm's bicubic), and see the README's probabilities: tiger cat 0.39, Egyptian cat 0.36."""
    from backprop_hooks.eval.explain_files import load_source

    x = models.photos(model=lite0)["chelsea"]
    assert torch.equal(x, load_source("chelsea", lite0))
    with torch.no_grad():
        p = lite0(x[None]).softmax(1)[0]
    assert round(float(p[282]), 2) == 0.39 and round(float(p[285]), 2) == 0.36 and round(float(p[281]), 2) == 0.17
