"""Modified-ReLU rules and methods: guided_backprop, deconvnet, guided_gradcam; in-place and functional ReLUs."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import backprop_hooks as bh
from backprop_hooks import methods, testing
from backprop_hooks.errors import RuleError
from backprop_hooks.errors import FunctionalReLUWarning, NonLinearContrastWarning
from backprop_hooks.rules import DeconvReLU, GuidedReLU, ReLUPassThrough

pytestmark = pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")

MODIFIED = ["guided_backprop", "deconvnet"]


def mini_vgg(seed: int = 0) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )
    return testing.randomize(model, seed)


def images(n=2, size=16, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ rules
@pytest.mark.parametrize("rule", [ReLUPassThrough(), GuidedReLU(), DeconvReLU()])
@pytest.mark.parametrize("module", [nn.Conv2d(1, 1, 1), nn.GELU(), nn.LeakyReLU(), nn.Hardtanh()])
def test_rules_refuse_non_relu_modules(rule, module):
    with pytest.raises(RuleError, match="nn.ReLU"):
        bh.attach(nn.Sequential(module), {type(module): rule})


@pytest.mark.parametrize("inplace", [False, True])
def test_rule_backwards_on_one_relu(inplace):
    x = torch.tensor([[-1.0, 2.0, 3.0, -4.0, 0.0]], dtype=torch.float64)
    g = torch.tensor([[5.0, -6.0, 7.0, 8.0, 9.0]], dtype=torch.float64)
    want = {
        ReLUPassThrough: g,
        GuidedReLU: torch.tensor([[0.0, 0.0, 7.0, 0.0, 0.0]], dtype=torch.float64),
        DeconvReLU: torch.tensor([[5.0, 0.0, 7.0, 8.0, 9.0]], dtype=torch.float64),
    }
    for rule_class, expected in want.items():
        model = nn.Sequential(nn.Identity(), nn.ReLU(inplace=inplace))
        with bh.attach(model, {nn.ReLU: rule_class()}):
            xg = x.clone().requires_grad_(True)
            got = torch.autograd.grad(model(xg * 1), xg, g)[0]
        assert torch.equal(got, expected), rule_class.__name__


class NoReLU(methods.Gradient):
    """The gradient with "ReLU removal": linear, so the contrast identities hold."""

    name = "gradient_no_relu"

    def rules(self, x):
        return {nn.ReLU: ReLUPassThrough()}


@settings(max_examples=testing.examples(15))
@given(testing.cases(acts=("relu", "relu_inplace")))
def test_relu_pass_through_is_linear_and_removes_the_relus(case):
    method = NoReLU(case.model)
    testing.assert_contrast_identities(method, case.x, rtol=1e-9, atol=1e-12)
    # an all-linear twin: the same weights with the ReLUs swapped for identities (on a copy)
    import copy

    twin = copy.deepcopy(case.model)
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, nn.Identity())
    e = method(case.x, target="weighted")
    xg = case.x.clone().requires_grad_(True)
    want = torch.autograd.grad(twin(xg), xg, bh.targets.get("weighted").seed(e.logits, e.classes))[0]
    torch.testing.assert_close(e.attributions, want, rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------------------------- methods
@given(testing.cases(batch=(2, 4), acts=("relu", "relu_inplace")), st.sampled_from(MODIFIED + ["guided_gradcam"]))
def test_inplace_equals_out_of_place_and_batch_equals_single(case, name):
    if name == "guided_gradcam" and case.x.dim() < 4:
        return
    method = methods.get(name)(case.model)
    testing.assert_batch_equals_single(method, case.x, target="weighted", rtol=1e-9, atol=1e-12)
    before = method(case.x, target="weighted").attributions  # the reference, taken before the flip
    relus = [m for m in case.model.modules() if isinstance(m, nn.ReLU)]
    flags = [m.inplace for m in relus]
    assert relus
    for module in relus:
        module.inplace = not module.inplace
    try:
        other = methods.get(name)(case.model)(case.x, target="weighted")
    finally:
        for module, flag in zip(relus, flags):
            module.inplace = flag
    torch.testing.assert_close(other.attributions, before, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", MODIFIED + ["guided_gradcam"])
def test_non_linear_flag_and_warning(name):
    model, x = mini_vgg(), images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not bh.explain(model, x, name, "logit").linear
    with pytest.warns(NonLinearContrastWarning):
        e = bh.explain(model, x, name, "weighted")
    assert not e.linear and e.attributions.shape == x.shape


class FunctionalNet(nn.Module):
    def __init__(self, mixed: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU() if mixed else None
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        if self.act is not None:
            h = self.act(h - 0.1)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("name", MODIFIED + ["guided_gradcam"])
def test_functional_relu_is_refused_or_flagged(name):
    """Hooks on modules cannot see F.relu: no nn.ReLU at all -> RuleError; some -> FunctionalReLUWarning."""
    x = images().float()
    with pytest.raises(RuleError, match="functional relu"):
        bh.explain(FunctionalNet(mixed=False), x, name)
    with pytest.warns(FunctionalReLUWarning, match="1 of 2 ReLU calls"):
        bh.explain(FunctionalNet(mixed=True), x, name, layer="conv") if name == "guided_gradcam" else bh.explain(
            FunctionalNet(mixed=True), x, name
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FunctionalReLUWarning)
        bh.explain(mini_vgg(), images(), name)


def test_guided_gradcam_is_guided_backprop_times_upsampled_gradcam():
    model, x = mini_vgg(), images()
    for relu in (False, True):
        e = bh.explain(model, x, "guided_gradcam", "weighted", layer="4", relu=relu)
        gb = bh.explain(model, x, "guided_backprop", "weighted").attributions
        cam = bh.explain(model, x, "gradcam", "weighted", layer="4", relu=relu).attributions
        want = gb * F.interpolate(cam[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(e.attributions, want, rtol=1e-10, atol=1e-13)
        assert e.layer == "4"


def test_leaves_model_untouched_also_after_an_exception():
    model, x = mini_vgg(), images()
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    model[4].bias.requires_grad_(False)
    model[8].train()  # a training flag that must survive (BatchNorm in training mode would update its buffers)
    before = testing.model_state(model)
    for name in MODIFIED + ["guided_gradcam"]:
        bh.explain(model, x, name, "max")
    testing.assert_same_state(model, before)

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model.append(Boom())
    before = testing.model_state(model)
    for name in MODIFIED + ["guided_gradcam"]:
        with pytest.raises(RuntimeError, match="boom"):
            bh.explain(model, x, name, **({"layer": "4"} if name == "guided_gradcam" else {}))
        testing.assert_same_state(model, before)


# -------------------------------------------------------------------------------------------- oracles
@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return testing.randomize(torchvision.models.resnet18(weights=None, num_classes=10), seed=2)


@pytest.mark.parametrize("name, oracle", [("guided_backprop", "GuidedBackprop"), ("deconvnet", "Deconvolution")])
@pytest.mark.parametrize("net", ["mini_vgg", "resnet18"])
def test_equal_captum(name, oracle, net, resnet18):
    """Captum's GuidedBackprop / Deconvolution (hooks on nn.ReLU modules; resnet reuses one in-place ReLU
    module several times per block)."""
    captum_attr = pytest.importorskip("captum.attr")
    model = mini_vgg() if net == "mini_vgg" else resnet18
    x = images(3, 32, seed=4)
    classes = torch.tensor([0, 3, 4])
    ours = bh.explain(model, x, name, "logit", classes=classes).attributions
    theirs = getattr(captum_attr, oracle)(model).attribute(x, target=classes)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_guided_gradcam_equals_captum():
    """Captum's GuidedGradCam clamps the Grad-CAM factor (relu=True) and interpolates (here bilinear)."""
    captum_attr = pytest.importorskip("captum.attr")
    model, x = mini_vgg(), images(3, 16, seed=5)
    classes = torch.tensor([1, 2, 0])
    ours = bh.explain(model, x, "guided_gradcam", "logit", classes=classes, layer="4", relu=True).attributions
    theirs = captum_attr.GuidedGradCam(model, model[4]).attribute(x, target=classes, interpolate_mode="bilinear")
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------- ReLU6 and friends
class _GuidedClip(torch.autograd.Function):
    """Oracle: y = clamp(x, 0, 6); backward relu(g) ⊙ [0 < x < 6] (guided) or relu(g) (deconvnet)."""

    @staticmethod
    def forward(ctx, x, deconv):
        ctx.save_for_backward(x)
        ctx.deconv = deconv
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if ctx.deconv:
            return g.clamp(min=0), None
        return g.clamp(min=0) * ((x > 0) & (x < 6)).to(g.dtype), None


class _OracleReLU6(nn.Module):
    def __init__(self, deconv):
        super().__init__()
        self.deconv = deconv

    def forward(self, x):
        return _GuidedClip.apply(x, self.deconv)


def relu6_net(seed=0, inplace=False):
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU6(inplace=inplace),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU6(inplace=inplace),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )
    model = testing.randomize(model, seed)
    for conv in (model[0], model[2]):  # spread pre-activations over both clips, 0 and 6
        conv.weight.data *= 12.0
    return model


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", MODIFIED)
def test_relu6_rule_equals_explicit_oracle(name, inplace):
    model = relu6_net(inplace=inplace)
    oracle = relu6_net(inplace=False)
    oracle[1], oracle[3] = _OracleReLU6(name == "deconvnet"), _OracleReLU6(name == "deconvnet")
    x = images(3)
    with torch.no_grad():
        h = model[0](x)
    assert (h > 6).any() and (h < 0).any() and ((h > 0) & (h < 6)).any()  # all three regions are exercised
    classes = torch.tensor([0, 3, 4])
    for target in ("logit", "weighted"):
        got = bh.explain(model, x, name, target, classes=classes).attributions
        xo = x.clone().requires_grad_(True)
        logits = oracle(xo)
        seed = bh.targets.get(target).seed(logits.detach(), classes)
        (expected,) = torch.autograd.grad(logits, xo, seed)
        torch.testing.assert_close(got, expected)
    # the guided rule keeps the module's local gradient: where it passes g >= 0, it equals plain autograd
    plain = bh.explain(model, x, "gradient", "logit", classes=classes).attributions
    assert not torch.allclose(plain, bh.explain(model, x, name, "logit", classes=classes).attributions)


def test_relu6_guided_equals_captum_on_relu_twin():
    """Where Captum applies (nn.ReLU), our rule and Captum's agree; on a net whose pre-activations stay below 6,
    ReLU6 and ReLU are the same function and our guided maps agree too."""
    captum = pytest.importorskip("captum.attr")
    relu6 = relu6_net()
    for conv in (relu6[0], relu6[2]):
        conv.weight.data /= 100.0  # every pre-activation below 6
    relu = relu6_net()
    relu.load_state_dict(relu6.state_dict())
    relu[1], relu[3] = nn.ReLU(), nn.ReLU()
    x = images(2)
    with torch.no_grad():
        assert relu6[0](x).max() < 6
    ours = bh.explain(relu6, x, "guided_backprop", "logit", classes=torch.tensor([1, 2])).attributions
    theirs = captum.GuidedBackprop(relu).attribute(x, target=torch.tensor([1, 2]))
    torch.testing.assert_close(ours, theirs)


def test_guided_methods_run_on_efficientnet_lite0_relu6():
    from backprop_hooks import models

    model = models.create("efficientnet_lite0", pretrained=False)
    x = torch.rand(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FunctionalReLUWarning)
        for name in ("guided_backprop", "deconvnet", "guided_gradcam"):
            e = bh.explain(model, x, name, "weighted", classes=torch.tensor([3]))
            assert e.attributions.shape == x.shape and e.attributions.abs().sum() > 0
    gb = bh.explain(model, x, "guided_backprop", "logit", classes=torch.tensor([3])).attributions
    plain = bh.explain(model, x, "gradient", "logit", classes=torch.tensor([3])).attributions
    assert not torch.allclose(gb, plain)


def test_smooth_activations_are_named_in_the_refusal_and_the_mixed_warning():
    silu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.LazyLinear(3))
    silu(torch.rand(1, 3, 8, 8))
    with pytest.raises(RuleError, match="SiLU") as info:
        bh.explain(silu, torch.rand(1, 3, 8, 8), "guided_backprop")
    assert "F.relu" not in str(info.value) and "source" not in str(info.value)
    mixed = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Hardswish(), nn.Flatten(), nn.LazyLinear(3)
    )
    mixed(torch.rand(1, 3, 8, 8))
    with pytest.warns(FunctionalReLUWarning, match="Hardswish.*plain"):
        bh.explain(mixed, torch.rand(1, 3, 8, 8), "guided_backprop")
