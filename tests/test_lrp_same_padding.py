"""LRP on timm's Conv2dSame ("SAME" padding, possibly asymmetric) and BatchNormAct2d, and every CNN method on
the bundled EfficientNet-Lite0 (which is built from them, with ReLU6 activations).

Oracle: the same network built from plain modules (``ZeroPad2d`` + ``Conv2d`` for ``Conv2dSame``,
``BatchNorm2d`` + the activation for ``BatchNormAct2d``) gives the same LRP relevance. Rules whose
input is a constant (Flat, ZBox: only ever on the first layer) count the padding as no input, like a
``Conv2d(padding=...)``: there the oracle is a padded ``Conv2d`` (symmetric "SAME" padding).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.rules.layers import is_conv2d_same, same_padding

timm_layers = pytest.importorskip("timm.layers")

pytestmark = pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")
COMPOSITES = ["epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1"]


def plain(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with every Conv2dSame replaced by ZeroPad2d + Conv2d (the padding it applies to
    its input at ``x``) and every BatchNormAct2d by BatchNorm2d + its activation."""
    model = copy.deepcopy(model)
    sizes = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: sizes.__setitem__(n, a[0].shape))
        for n, m in model.named_modules()
        if is_conv2d_same(m)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if is_conv2d_same(child):
                conv = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    0,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                    dtype=x.dtype,
                )
                conv.load_state_dict(child.state_dict())
                pad = nn.ZeroPad2d(same_padding(child, torch.empty(sizes[full])))
                setattr(parent, name, nn.Sequential(pad, conv))
            elif type(child).__name__ == "BatchNormAct2d":
                bn = nn.BatchNorm2d(child.num_features, child.eps, dtype=x.dtype)
                bn.load_state_dict(child.state_dict(), strict=False)
                setattr(parent, name, nn.Sequential(bn, child.drop, child.act))
    return model.eval()


def lrp(model, x, composite, canonize=True):
    return bh.explain(model, x, "lrp", "weighted", composite=composite, canonize=canonize).attributions


def scrambled_batchnorms(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.weight.normal_(1, 0.2, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
    return model


@pytest.mark.parametrize(
    "stride,size",
    [
        (2, 8),
        pytest.param(1, 8, marks=pytest.mark.slow),
        pytest.param(2, 7, marks=pytest.mark.slow),
        pytest.param(3, 8, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("composite", COMPOSITES + ["epsilon_gamma_box"])
def test_conv2d_same_equals_explicit_zero_padding(stride, size, composite):
    """Asymmetric padding included (stride 2 on an even size pads one more at the bottom/right)."""
    torch.manual_seed(stride * 10 + size)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        timm_layers.Conv2dSame(4, 5, 3, stride),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    net(x)
    net = scrambled_batchnorms(net).eval()
    options = {"low": -1.0, "high": 2.0} if composite == "epsilon_gamma_box" else {}
    for canonize in (True, False):
        got = bh.explain(net, x, "lrp", "weighted", composite=composite, canonize=canonize, **options)
        want = bh.explain(plain(net, x), x, "lrp", "weighted", composite=composite, canonize=canonize, **options)
        torch.testing.assert_close(got.attributions, want.attributions, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_conv2d_same_as_first_layer_equals_a_padded_conv(composite):
    """Constant-input rules on a Conv2dSame first layer: padding counts as no input, as with Conv2d(padding=1)."""
    torch.manual_seed(0)
    same = nn.Sequential(timm_layers.Conv2dSame(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
    padded = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
    padded.load_state_dict(same.state_dict())
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    options = {"low": -1.0, "high": 2.0} if composite == "epsilon_gamma_box" else {}
    got = bh.explain(same.eval(), x, "lrp", "weighted", composite=composite, **options).attributions
    want = bh.explain(padded.eval(), x, "lrp", "weighted", composite=composite, **options).attributions
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def efficientnet_lite0():
    from backprop_hooks.models import efficientnet_lite

    torch.manual_seed(0)
    return scrambled_batchnorms(efficientnet_lite.build(num_classes=10).double()).eval()


@pytest.mark.slow
def test_efficientnet_lite0_lrp_equals_its_plain_twin():
    """The bundled real model's architecture (random weights): LRP was refused on its Conv2dSame layers."""
    model = efficientnet_lite0()
    x = torch.rand(1, 3, 33, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    twin = plain(model, x)
    before = testing.model_state(model)
    torch.testing.assert_close(lrp(model, x, "epsilon"), lrp(twin, x, "epsilon"), rtol=1e-9, atol=1e-14)
    testing.assert_same_state(model, before)


@pytest.mark.slow
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_alpha2_beta1"])
@pytest.mark.parametrize("canonize", [True, False])
def test_efficientnet_lite0_lrp_every_composite(composite, canonize):
    model = efficientnet_lite0()
    x = torch.rand(2, 3, 65, 63, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = lrp(plain(model, x), x, composite, canonize)
    torch.testing.assert_close(
        lrp(model, x, composite, canonize), want, rtol=1e-9, atol=1e-12 * float(want.abs().max())
    )


@pytest.mark.slow
def test_efficientnet_lite0_every_cnn_method():
    """Every method that makes sense for a CNN runs on the bundled model (ReLU6: guided backprop and deconvnet
    included), leaves no trace, and gives finite maps at input resolution."""
    model = efficientnet_lite0().float()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    before = testing.model_state(model)
    options = {"smoothgrad": {"n_samples": 2}, "integrated_gradients": {"n_steps": 2}}
    for name in [m for m in bh.methods.available() if bh.methods.get(m).space != "tokens"]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", bh.errors.FunctionalReLUWarning)  # every ReLU6 is a module
            e = bh.explain(model, x, name, "weighted", **options.get(name, {}))
        assert e.maps.shape == (2, 64, 64) and bool(torch.isfinite(e.maps).all()), name
    testing.assert_same_state(model, before)
