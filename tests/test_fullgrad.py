"""FullGrad: completeness of the raw parts, linearity of the raw sum, post-processing, pytorch-grad-cam oracle."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.errors import InputError, RuleError
from backprop_hooks.errors import NonLinearContrastWarning
from backprop_hooks.methods import FullGrad
from backprop_hooks.methods.cam import upsample
from backprop_hooks.methods.fullgrad import abs_minmax, signed_maxabs
from backprop_hooks.rules import BiasGradient

pytestmark = pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")

RELU_CNNS = testing.cases(kinds=("cnn",), acts=("relu", "relu_inplace"))


def explained_output(e):
    """f(x) = seed · logits: the objective whose raw FullGrad parts must add up to it."""
    seed = bh.targets.get(e.target).seed(e.logits, e.classes) if e.target != "versus" else None
    return (seed * e.logits).sum(1)


@settings(max_examples=testing.examples(15))
@given(
    RELU_CNNS,
    st.sampled_from(["logit", "weighted", "softmax", "mean", "max"]),
    st.sampled_from(["abs", "signed", None]),
)
def test_completeness_on_relu_networks(case, target, post):
    """Σ x⊙∇x + Σ_l Σ b_l⊙∂f/∂y_l = f(x) for piecewise-linear nets (BatchNorm in eval mode is affine and
    counted with its effective bias; the classifier head's bias is a non-spatial part)."""
    e = FullGrad(case.model, post=post)(case.x, target=target)
    want = explained_output(e)  # the parts themselves: test_maps_and_every_raw_part_equal_an_autograd_oracle
    torch.testing.assert_close(e.extras["total"], want, rtol=1e-9, atol=1e-9 * (1 + float(want.abs().max())))


@settings(max_examples=testing.examples(6))
@given(testing.cases(kinds=("cnn",)))
def test_raw_signed_sum_is_linear_in_the_seed(case):
    method = FullGrad(case.model, post=None)
    assert method.linear
    testing.assert_contrast_identities(method, case.x, rtol=1e-9, atol=1e-12)


@settings(max_examples=testing.examples(6))
@given(testing.cases(kinds=("cnn",), batch=(2, 4)), st.sampled_from(["abs", "signed", None]))
def test_batch_equals_single(case, post):
    testing.assert_batch_equals_single(
        FullGrad(case.model, post=post), case.x, target="weighted", rtol=1e-9, atol=1e-12
    )


class ChannelsLast(nn.Module):
    """A conv stem, then a Linear on a channel-last (B, h, w, C) map (as in ConvNeXt), then a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.mix(self.act(self.conv(x)).permute(0, 2, 3, 1))
        return self.head(self.act(h).mean((1, 2)))


def test_channel_last_linear_is_a_spatial_part_and_completeness_holds():
    model = testing.randomize(ChannelsLast(), seed=0)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    e = bh.explain(model, x, "fullgrad", "weighted", post=None)
    assert {k: tuple(v.shape) for k, v in e.extras["bias"].items()} == {
        "conv": (2, 6, 6),
        "mix": (2, 6, 6),
        "head": (2,),
    }
    torch.testing.assert_close(e.extras["total"], explained_output(e), rtol=1e-10, atol=1e-10)
    assert e.attributions.shape == (2, 6, 6)


def test_post_processing_is_computed_from_the_raw_parts():
    """ "signed": each part's channel sum over its max |·|; None: the raw channel sums; both upsampled."""
    model = testing.randomize(testing.CNN(3, 8, 4, 2, 5, batchnorm=True), seed=1)
    model.pool = nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2))  # a part at half resolution
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for post, reduce in [
        ("signed", lambda s: s / (s.flatten(1).abs().amax(1).view(-1, 1, 1) + 1e-6)),
        (None, lambda s: s),
    ]:
        e = bh.explain(model, x, "fullgrad", "max", post=post)
        want = reduce(e.extras["input"].sum(1)) + sum(
            upsample(reduce(p), (8, 8)) for p in e.extras["bias"].values() if p.dim() == 3
        )
        torch.testing.assert_close(e.attributions, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(e.maps, e.attributions)
    signed = bh.explain(model, x, "fullgrad", "max", post="signed")
    assert signed.attributions.abs().max() <= 1 + len(signed.extras["bias"])


def test_abs_is_per_part_min_max_and_nonnegative():
    part = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    got = abs_minmax(part)
    m = part.abs()
    for b in range(3):
        want = ((m[b] - m[b].min()) / (m[b].max() - m[b].min() + 1e-6)).sum(0)
        torch.testing.assert_close(got[b], want)
    s = signed_maxabs(part)
    torch.testing.assert_close(s.flatten(1).abs().amax(1), torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0)


def test_linear_flags_and_warnings():
    model = testing.randomize(testing.CNN(3, 6, 4, 1, 4), seed=2)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bh.explain(model, x, "fullgrad", "weighted", post=None).linear
        assert not bh.explain(model, x, "fullgrad", "logit").linear
    for post in ["abs", "signed", abs_minmax]:
        with pytest.warns(NonLinearContrastWarning):
            assert not bh.explain(model, x, "fullgrad", "weighted", post=post).linear


def test_errors():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="'abs', 'signed'"):
        FullGrad(nn.Conv2d(3, 2, 1), post="relu")
    no_bias = nn.Sequential(nn.Conv2d(3, 2, 3, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    with pytest.raises(InputError, match="bias"):
        bh.explain(no_bias, x, "fullgrad")
    with pytest.raises(RuleError, match="without a bias"):
        bh.attach(no_bias, {nn.Conv2d: BiasGradient()})
    with pytest.raises(InputError, match="spatial input"):
        bh.explain(
            testing.randomize(testing.MLP(4, 4, 1, 3), seed=0), torch.randn(2, 4, dtype=torch.float64), "fullgrad"
        )


def test_leaves_model_untouched_also_after_an_exception():
    model = testing.randomize(testing.CNN(3, 6, 4, 2, 4, batchnorm=True, act="relu_inplace"), seed=3)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    model.stem[0].bias.requires_grad_(False)
    before = testing.model_state(model)
    for post in ["abs", "signed", None]:
        bh.explain(model, x, "fullgrad", "weighted", post=post)
    testing.assert_same_state(model, before)

    def boom(module, inputs, output):
        raise RuntimeError("boom")

    h = model.head.register_forward_hook(boom)  # the test's own failing model, not framework plumbing
    before = testing.model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        bh.explain(model, x, "fullgrad")
    testing.assert_same_state(model, before)
    h.remove()


# --------------------------------------------------------------------------------- pytorch-grad-cam
# Its per-channel min-max normalisation divides every bias value out (|b_c g_c| normalised per channel is
# |g_c| normalised): these comparisons check the gradient maps, positions and resizing, not the biases.
def _pgc_fullgrad(model, x, classes):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cam = pgc.FullGrad(model=model, target_layers=[])
        try:
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
        finally:
            cam.activations_and_grads.release()


def _minmax(m):
    lo, hi = m.flatten(1).amin(1).view(-1, 1, 1), m.flatten(1).amax(1).view(-1, 1, 1)
    return (m - lo) / (hi - lo + 1e-7)


def per_channel_abs_minmax(part: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's post-processing: every channel of every part min-max normalised on its own."""
    m = part.abs()
    lo = m.flatten(2).amin(2)[..., None, None]
    hi = m.flatten(2).amax(2)[..., None, None]
    return ((m - lo) / (hi - lo + 1e-7)).sum(1)


def test_raw_parts_equal_pytorch_grad_cam_fullgrad_on_resnet18():
    """Same raw parts as pytorch-grad-cam's FullGrad on torchvision resnet18 (BatchNorm2d effective biases,
    convs without bias): with its per-channel normalisation passed as ``post`` and its final min-max
    applied here, the maps agree to 1e-5 (its output is float32; its cv2 resize and our bilinear
    ``align_corners=False`` upsampling coincide). Documented differences: per-channel (ours: per-part)
    normalisation, final min-max, eps 1e-7 (ours 1e-6), Conv2d/BatchNorm2d only, logits only."""
    torchvision = pytest.importorskip("torchvision")
    model = testing.randomize(torchvision.models.resnet18(weights=None, num_classes=10), seed=4)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    classes = [3, 8]
    ours = _minmax(bh.explain(model, x, "fullgrad", "logit", classes=classes, post=per_channel_abs_minmax).attributions)
    np.testing.assert_allclose(ours.float().numpy(), _pgc_fullgrad(model, x, classes), atol=1e-5)


def test_abs_maps_equal_pytorch_grad_cam_where_normalisations_coincide():
    """One input channel, one channel per biased layer, full resolution: per-channel = per-part min-max and
    no resizing, so ``post="abs"`` with pytorch-grad-cam's eps (1e-7), min-max normalised, equals its
    FullGrad to 1e-5 (float32 output)."""
    model = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1),
        nn.BatchNorm2d(1),
        nn.ReLU(inplace=True),
        nn.Conv2d(1, 1, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 4),
    )
    model = testing.randomize(model, seed=5)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = _minmax(bh.explain(model, x, "fullgrad", "logit", classes=[0, 1, 3], eps=1e-7).attributions)
    np.testing.assert_allclose(ours.float().numpy(), _pgc_fullgrad(model, x, [0, 1, 3]), atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("batch_stats", [False, True])
def test_batchnorm_effective_bias_is_the_offset_of_its_affine_map(affine, batch_stats):
    """BatchNorm computes y = a·x + c per channel; the effective bias is c (running statistics in eval
    mode, the batch's statistics when it normalises with them)."""
    from backprop_hooks.rules.fullgrad import effective_bias

    bn = testing.randomize(nn.BatchNorm2d(3, affine=affine, track_running_stats=not batch_stats), seed=6)
    bn.train(batch_stats)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    c = effective_bias(bn, (x,)).view(1, 3, 1, 1)
    zero_in = bn(torch.zeros_like(x)) if not batch_stats else None
    y = bn(x)
    if zero_in is not None:  # eval: the map is affine in x, so bn(0) = c
        torch.testing.assert_close(zero_in, c.expand_as(x))
    a = (y - c) / x  # per channel constant
    torch.testing.assert_close(a, a[:1, :, :1, :1].expand_as(a), rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------ an oracle that shares nothing with the code
def _fullgrad_oracle(model, x, seed, post, eps=1e-6):
    """FullGrad written out with plain autograd: ``x ⊙ ∂f/∂x`` and, for every biased module, the bias
    contribution ``b_c ∂f/∂y_c`` read as the gradient of ``f`` with respect to a zero field ``s`` added to
    the module's output as ``y + s·b`` (BatchNorm's ``b`` measured as its output on a zero input)."""
    fields, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            bias = module.bias.detach()
        elif isinstance(module, nn.BatchNorm2d):
            assert not module.training
            with torch.no_grad():
                bias = module(torch.zeros(1, module.num_features, 1, 1, dtype=x.dtype)).flatten()
        else:
            continue

        def add_field(mod, inputs, output, name=name, bias=bias):
            channel_last = isinstance(mod, nn.Linear) and output.dim() == 4
            shape = (1, 1, 1, -1) if channel_last else (1, -1, *([1] * (output.dim() - 2)))
            s = torch.zeros_like(output, requires_grad=True)
            fields[name] = (s, bias, channel_last)
            return output + s * bias.view(shape)

        hooks.append(module.register_forward_hook(add_field))
    try:
        xg = x.detach().clone().requires_grad_(True)
        f = (model(xg) * seed).sum()
        grads = torch.autograd.grad(f, [xg] + [s for s, _, _ in fields.values()])
    finally:
        for h in hooks:
            h.remove()
    parts = {}
    for (name, (_, _, channel_last)), contribution in zip(fields.items(), grads[1:]):  # ∂f/∂s = b ⊙ ∂f/∂y
        parts[name] = contribution.movedim(-1, 1) if channel_last else contribution  # channels on dim 1
    input_part = x * grads[0]

    def reduce(p):
        if post is None:
            return p.sum(1)
        if post == "signed":
            s = p.sum(1)
            return s / (s.flatten(1).abs().max(1).values.view(-1, 1, 1) + eps)
        m = p.abs()  # "abs": min-max per sample over channels and positions, then the channel sum
        lo, hi = m.flatten(1).min(1).values.view(-1, 1, 1, 1), m.flatten(1).max(1).values.view(-1, 1, 1, 1)
        return ((m - lo) / (hi - lo + eps)).sum(1)

    size = x.shape[2:]
    heat = reduce(input_part)
    for p in parts.values():
        if p.dim() == 4:
            heat = (
                heat
                + torch.nn.functional.interpolate(reduce(p)[:, None], size=size, mode="bilinear", align_corners=False)[
                    :, 0
                ]
            )
    raw = {n: p.sum(1) if p.dim() == 4 else p.flatten(1).sum(1) for n, p in parts.items()}
    return heat, input_part, raw


@pytest.mark.parametrize("post", [None, "signed", "abs"])
@pytest.mark.parametrize("net", ["cnn_bn_pool", "channels_last"])
def test_maps_and_every_raw_part_equal_an_autograd_oracle(net, post):
    """The map, the input part and every layer's bias part (values, signs, positions, layer names) equal the
    oracle above; ``total`` is their sum and equals ``f(x)`` (the nets are piecewise linear)."""
    if net == "cnn_bn_pool":
        model = testing.randomize(testing.CNN(3, 8, 4, 2, 5, batchnorm=True, act="relu_inplace"), seed=11)
        model.pool = nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2))  # a part at half resolution
        x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    else:
        model = testing.randomize(ChannelsLast(), seed=12)
        x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    e = bh.explain(model, x, "fullgrad", "weighted", post=post)
    seed = bh.targets.Weighted().seed(e.logits, e.classes)
    heat, input_part, raw = _fullgrad_oracle(model, x, seed, post)
    torch.testing.assert_close(e.attributions, heat, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(e.extras["input"], input_part, rtol=1e-9, atol=1e-12)
    assert list(e.extras["bias"]) == list(raw)  # forward order, qualified names
    for name, want in raw.items():
        torch.testing.assert_close(e.extras["bias"][name], want, rtol=1e-9, atol=1e-12, msg=name)
    total = input_part.flatten(1).sum(1) + sum(r.flatten(1).sum(1) if r.dim() > 1 else r for r in raw.values())
    torch.testing.assert_close(e.extras["total"], total, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(total, (e.logits * seed).sum(1), rtol=1e-9, atol=1e-9)
