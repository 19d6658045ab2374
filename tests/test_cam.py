"""The CAM family (gradcam, xgradcam, linear_approx): contrast identities, partial backward, layer choice,
Captum and pytorch-grad-cam oracles, batching and a clean model afterwards."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import backprop_hooks as bh
from backprop_hooks import methods, testing
from backprop_hooks.errors import InputError, UnknownNameError
from backprop_hooks.errors import NonLinearContrastWarning

CAMS = ["gradcam", "xgradcam", "linear_approx"]


def mini_vgg(seed: int = 0) -> nn.Module:
    """A VGG-shaped net (``features.N`` names, BatchNorm, in-place ReLUs, max-pooling), random weights, float64."""

    class MiniVGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 12, 3, padding=1),
                nn.BatchNorm2d(12),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Conv2d(12, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(inplace=True),
            )
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 7))

        def forward(self, x):
            return self.classifier(self.avgpool(self.features(x)).flatten(1))

    return testing.randomize(MiniVGG(), seed)


@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return testing.randomize(torchvision.models.resnet18(weights=None, num_classes=10), seed=0)


def images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def manual_cam(model, layer, x, seed_fn, kind):
    """Independent oracle: the layer's output and gradient from plain torch hooks on a clone of the model."""
    store = {}
    module = dict(model.named_modules())[layer]
    h = module.register_forward_hook(lambda m, i, o: store.setdefault("a", o) if o.requires_grad else None)
    try:
        xg = x.detach().clone().requires_grad_(True)
        y = model(xg)
    finally:
        h.remove()
    a = store["a"]
    g = torch.autograd.grad(y, a, seed_fn(y.detach()))[0]
    if kind == "gradcam":
        w = g.mean((2, 3))
        return (w[:, :, None, None] * a).sum(1)
    if kind == "xgradcam":
        w = (a * g).sum((2, 3)) / (a.abs().sum((2, 3)) + 1e-7)
        return (w[:, :, None, None] * a).sum(1)
    return (a * g).sum(1)


# ------------------------------------------------------------------------------------------ identities
@settings(max_examples=testing.examples(15))
@given(testing.cases(kinds=("cnn",)), st.sampled_from(CAMS), st.sampled_from([None, "stem"]))
def test_contrast_identities_signed_cams(case, name, layer):
    """Signed CAMs are linear in the seed: every contrast equals the per-class composition."""
    method = methods.get(name)(case.model, layer=layer)
    assert method.linear
    testing.assert_contrast_identities(method, case.x, rtol=1e-9, atol=1e-12)


@given(testing.cases(kinds=("cnn",), batch=(2, 4)), st.sampled_from(CAMS), st.booleans())
@pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")
def test_batch_equals_single(case, name, relu):
    testing.assert_batch_equals_single(
        methods.get(name)(case.model, relu=relu), case.x, target="weighted", rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("name", CAMS)
@pytest.mark.parametrize("target", ["logit", "weighted", "max"])
def test_equals_manual_layer_gradient_with_inplace_relu_after_layer(name, target):
    """The captured conv output feeds BatchNorm + in-place ReLU: the read activation is not overwritten."""
    model = mini_vgg()
    x = images()
    tgt = bh.targets.get(target)
    for layer in ["features.4", "features.8", "features.10"]:
        e = bh.explain(model, x, name, target, layer=layer)
        want = manual_cam(model, layer, x, lambda y: tgt.seed(y, e.classes), name)
        torch.testing.assert_close(e.attributions, want, rtol=1e-10, atol=1e-12)
        assert e.layer == layer and e.maps.shape == (2, 32, 32)


def test_relu_option_is_classic_map_and_not_linear():
    model, x = mini_vgg(), images()
    signed = bh.explain(model, x, "gradcam", "logit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        classic = bh.explain(model, x, "gradcam", "logit", relu=True)  # logit target: no warning
    torch.testing.assert_close(classic.attributions, signed.attributions.clamp(min=0))
    assert signed.linear and not classic.linear
    with pytest.warns(NonLinearContrastWarning):
        e = bh.explain(model, x, "xgradcam", "weighted", relu=True)
    assert not e.linear and (e.attributions >= 0).all()


def test_maps_are_bilinear_upsampled_layer_grid():
    model, x = mini_vgg(), images(size=40)
    e = bh.explain(model, x, "linear_approx", "mean")
    assert e.attributions.shape == (2, 10, 10)
    torch.testing.assert_close(
        e.maps, F.interpolate(e.attributions[:, None], size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    )


def test_default_layer_is_last_spatial_module():
    model, x = mini_vgg(), images()
    e = bh.explain(model, x, "gradcam")
    assert e.layer == "features"  # the Sequential, run last; its output is features.10's
    torch.testing.assert_close(e.attributions, bh.explain(model, x, "gradcam", layer="features.10").attributions)


class _CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


class _Spy(nn.Module):
    def forward(self, x):
        return _CountBackward.apply(x)


@pytest.mark.parametrize("name", CAMS)
def test_backward_stops_at_the_layer(name):
    """Only a partial backward: nothing below the chosen layer is differentiated."""
    model = mini_vgg()
    model.features.insert(0, _Spy())  # now features.0 is the spy, convs shift by one
    _CountBackward.calls = 0
    bh.explain(model, images(), name, "weighted", layer="features.5")
    assert _CountBackward.calls == 0
    bh.explain(model, images(), "gradient", "weighted")
    assert _CountBackward.calls == 1


def test_leaves_model_untouched_also_after_an_exception():
    model, x = mini_vgg(), images()
    model.classifier[0].weight.grad = torch.ones_like(model.classifier[0].weight)
    model.features[0].bias.requires_grad_(False)
    before = testing.model_state(model)
    for name in CAMS:
        bh.explain(model, x, name, "weighted", layer="features.8")
    testing.assert_same_state(model, before)

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model.classifier.append(Boom())
    before = testing.model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        bh.explain(model, x, "gradcam", "weighted", layer="features.8")
    testing.assert_same_state(model, before)


def test_clear_errors_for_bad_layers():
    model, x = mini_vgg(), images()
    with pytest.raises(UnknownNameError, match="features.10"):
        bh.explain(model, x, "gradcam", layer="features.100")
    with pytest.raises(InputError, match="spatial map"):
        bh.explain(model, x, "gradcam", layer="classifier.0")


# --------------------------------------------------------------------------------------------- oracles
def test_gradcam_equals_captum_layer_gradcam(resnet18):
    """Captum's LayerGradCam (relu_attributions=False) is Σ_k mean(∂y_t/∂A_k) A_k, as ours."""
    captum_attr = pytest.importorskip("captum.attr")
    x = images(3, 64)
    classes = torch.tensor([1, 4, 9])
    for layer in ["layer4", "layer3.1"]:
        ours = bh.explain(resnet18, x, "gradcam", "logit", classes=classes, layer=layer).attributions
        module = dict(resnet18.named_modules())[layer]
        theirs = captum_attr.LayerGradCam(resnet18, module).attribute(x, target=classes, relu_attributions=False)[:, 0]
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def _minmax(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten(1)
    lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    return (m - lo) / (hi - lo + 1e-7)


@pytest.mark.parametrize("name", ["gradcam", "xgradcam"])
def test_classic_maps_equal_pytorch_grad_cam(resnet18, name):
    """relu=True, min-max normalised on the layer grid, upsampled, min-max normalised again (pytorch-grad-cam
    normalises before its cv2.resize, bilinear with half-pixel centres as torch's align_corners=False,
    and again when it aggregates layers): equal to 1e-5 (its output is float32). pytorch-grad-cam's XGradCAM
    divides by Σ A, ours by Σ |A|: equal on layer4, whose output follows a ReLU."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = images(2, 64, seed=3)
    classes = [2, 7]
    ours = bh.explain(resnet18, x, name, "logit", classes=classes, layer="layer4", relu=True).attributions
    ours = _minmax(F.interpolate(_minmax(ours)[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0])
    cls = {"gradcam": pgc.GradCAM, "xgradcam": pgc.XGradCAM}[name]
    with cls(model=resnet18, target_layers=[resnet18.layer4]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    np.testing.assert_allclose(ours.float().numpy(), theirs, atol=1e-5)


@pytest.mark.slow
def test_vgg11_bn_oracles_on_named_feature_layer():
    """torchvision vgg11_bn, ``layer="features.25"``: Captum LayerGradCam and pytorch-grad-cam GradCAM."""
    torchvision = pytest.importorskip("torchvision")
    captum_attr = pytest.importorskip("captum.attr")
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = testing.randomize(torchvision.models.vgg11_bn(weights=None, num_classes=10), seed=1, dtype=torch.float32)
    x = images(2, 64).float()
    ours = bh.explain(model, x, "gradcam", "logit", classes=[3, 5], layer="features.25")
    theirs = captum_attr.LayerGradCam(model, model.features[25]).attribute(x, target=[3, 5], relu_attributions=False)[
        :, 0
    ]
    torch.testing.assert_close(ours.attributions, theirs, rtol=1e-4, atol=1e-6)
    classic = bh.explain(model, x, "gradcam", "logit", classes=[3, 5], layer="features.27", relu=True).attributions
    classic = _minmax(
        F.interpolate(_minmax(classic)[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    )
    with pgc.GradCAM(model=model, target_layers=[model.features[27]]) as cam:
        want = cam(input_tensor=x, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(5)])
    np.testing.assert_allclose(classic.numpy(), want, atol=1e-4)
