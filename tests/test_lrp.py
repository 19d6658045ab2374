"""LRP: oracles against Zennit, conservation, contrast identities, BatchNorm merging, state hygiene."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.errors import RuleError, UnknownNameError
from backprop_hooks.methods import LRP
from backprop_hooks.rules import AlphaBeta, Epsilon, Flat, Gamma, MergeBatchNorm, ZBox, ZPlus
from backprop_hooks.rules.canonizers import merged_params
from backprop_hooks.rules.composites import COMPOSITES, first_layer
from backprop_hooks.rules.layers import layer_forward

try:  # Zennit is an oracle: without it only the tests comparing with it are skipped, not the properties
    from zennit import rules as zrules
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import (
        EpsilonAlpha2Beta1,
        EpsilonGammaBox,
        EpsilonPlus,
        EpsilonPlusFlat,
        LayerMapComposite,
        NameMapComposite,
    )
    from zennit.rules import Epsilon as ZEpsilon, Pass
    from zennit.types import Activation
except ImportError:  # pragma: no cover
    zrules = None
needs_zennit = pytest.mark.skipif(zrules is None, reason="needs zennit (an oracle)")

SETTINGS = dict(
    max_examples=max(4, settings.default.max_examples // 2),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEWER = dict(SETTINGS, max_examples=max(3, settings.default.max_examples // 4))  # tests running C + 7 explanations
OPTIONS = {"epsilon_gamma_box": dict(low=-3.0, high=3.0)}


def vgg(batchnorm: bool = False, seed: int = 0) -> nn.Sequential:
    """A small VGG: conv(+BN)+in-place ReLU+max-pool blocks, then Linear+ReLU+Dropout+Linear."""

    def block(cin, cout):
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            *([nn.BatchNorm2d(cout)] if batchnorm else []),
            nn.ReLU(inplace=True),
        ]

    net = nn.Sequential(
        *block(3, 6),
        nn.MaxPool2d(2),
        *block(6, 8),
        nn.MaxPool2d(2),
        *block(8, 8),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(16, 5),
    )
    net = testing.randomize(net, seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0  # Zennit's merge leaves the BN computing x / sqrt(1 + eps); eps = 0 makes it exact
    return net


def zennit_composite(name: str, canonizers):
    if name == "epsilon":
        return LayerMapComposite(
            [(Activation, Pass()), (nn.BatchNorm2d, Pass()), ((nn.Conv2d, nn.Linear), ZEpsilon(1e-6))],
            canonizers=canonizers,
        )
    cls = {
        "epsilon_plus_flat": EpsilonPlusFlat,
        "epsilon_plus": EpsilonPlus,
        "epsilon_alpha2_beta1": EpsilonAlpha2Beta1,
        "epsilon_gamma_box": EpsilonGammaBox,
    }[name]
    return cls(canonizers=canonizers, **OPTIONS.get(name, {}))


def zennit_relevance(model, name, x, seed, canonize):
    """Zennit's input relevance for output relevance ``seed ⊙ logits`` (our convention at the top)."""
    x = x.clone().requires_grad_(True)
    with zennit_composite(name, [SequentialMergeBatchNorm()] if canonize else []).context(model) as modified:
        y = modified(x)
        (r,) = torch.autograd.grad(y, x, seed * y.detach())
    return r


# ------------------------------------------------------------------------------------------- oracles
@needs_zennit
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_matches_zennit(name, batchnorm):
    model = vgg(batchnorm, seed=len(name))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    e = bh.explain(model, x, method="lrp", composite=name, target="weighted", **OPTIONS.get(name, {}))
    seed = bh.targets.Weighted().seed(e.logits, e.classes)
    want = zennit_relevance(model, name, x, seed, canonize=batchnorm)
    torch.testing.assert_close(e.attributions, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


@needs_zennit
@pytest.mark.parametrize("name", ["epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_matches_zennit_mlp_with_batchnorm1d(name):
    """Linear layers only (the first one gets Flat under epsilon_plus_flat), BatchNorm1d merged."""
    model = testing.randomize(testing.MLP(6, 8, 2, 4, batchnorm=True), 3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eps = 0.0
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    e = bh.explain(model, x, method="lrp", composite=name, target="mean")
    seed = bh.targets.MeanContrast().seed(e.logits, e.classes)
    xg = x.clone().requires_grad_(True)
    composite = (
        zennit_composite(name, [SequentialMergeBatchNorm()])
        if name != "epsilon"
        else LayerMapComposite(
            [(Activation, Pass()), (nn.BatchNorm1d, Pass()), (nn.Linear, ZEpsilon(1e-6))],
            canonizers=[SequentialMergeBatchNorm()],
        )
    )
    with composite.context(model) as modified:
        y = modified(xg)
        (want,) = torch.autograd.grad(y, xg, seed * y.detach())
    torch.testing.assert_close(e.attributions, want, rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------- convolutions users have, every rule
from backprop_hooks.rules import WSquare  # noqa: E402
from backprop_hooks.rules.composites import Composite  # noqa: E402

CONVS = {
    # name: (input shape, a factory of the two convs)
    "grouped": ((4, 10, 10), lambda: (nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.Conv2d(6, 6, 3, groups=3))),
    "depthwise": (
        (3, 10, 10),
        lambda: (nn.Conv2d(3, 6, 3, groups=3, padding=1), nn.Conv2d(6, 6, 3, groups=6, padding=1)),
    ),
    "dilated_same": (
        (3, 11, 11),
        lambda: (nn.Conv2d(3, 4, 3, dilation=2, padding="same"), nn.Conv2d(4, 5, 5, padding="same")),
    ),
    "strided_valid": (
        (3, 13, 11),
        lambda: (nn.Conv2d(3, 4, 3, stride=2, padding="valid"), nn.Conv2d(4, 5, (3, 2), stride=(1, 2))),
    ),
    "conv1d": (
        (3, 17),
        lambda: (nn.Conv1d(3, 4, 5, stride=2, padding=2), nn.Conv1d(4, 5, 3, dilation=2, padding="same")),
    ),
    "conv3d": ((2, 5, 6, 6), lambda: (nn.Conv3d(2, 3, 3, padding=1), nn.Conv3d(3, 4, 2, stride=2, padding="valid"))),
}
# (ours, Zennit's) on the first conv, then on the second: constant-input rules (Flat, w², z^B) on the first
RULES = {
    "epsilon": (lambda: Epsilon(1e-6), lambda: zrules.Epsilon(1e-6)),
    "zplus": (lambda: ZPlus(), lambda: zrules.ZPlus()),
    "alpha2_beta1": (lambda: AlphaBeta(2.0, 1.0), lambda: zrules.AlphaBeta(2.0, 1.0)),
    "gamma": (lambda: Gamma(0.25), lambda: zrules.Gamma(0.25)),
    "flat": (lambda: Flat(), lambda: zrules.Flat()),
    "wsquare": (lambda: WSquare(), lambda: zrules.WSquare()),
    "zbox": (lambda: ZBox(-3.0, 3.0), lambda: zrules.ZBox(torch.tensor(-3.0), torch.tensor(3.0))),
}
SECOND = {"flat": "zplus", "wsquare": "gamma", "zbox": "alpha2_beta1"}


def conv_net(conv: str, seed: int = 0) -> nn.Module:
    shape, make = CONVS[conv]
    first, second = make()
    body = nn.Sequential(first, nn.ReLU(), second, nn.ReLU())
    with torch.no_grad():
        features = body(torch.zeros(1, *shape)).numel()
    net = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.Flatten(), nn.Linear(features, 4))
    return testing.randomize(net, seed)


class Each(Composite):
    """A composite from two rule factories: the first conv, the other convs; ε on Linear layers."""

    def __init__(self, first_rule, conv_rule):
        super().__init__(canonize=False)
        self.first_rule, self.conv_rule = first_rule, conv_rule

    def first(self, bn):
        rule = self.first_rule()
        rule.input_layer = True
        return rule

    def conv(self, bn, input_layer=False):
        return self.conv_rule()


def _conv_rule_pairs():
    """Every geometry with every rule; the default run takes two rules per geometry (all rules covered)."""
    names = sorted(RULES)
    for i, conv in enumerate(sorted(CONVS)):
        default = {names[i % len(names)], names[(i + len(CONVS)) % len(names)]}
        for rule in names:
            yield pytest.param(conv, rule, marks=() if rule in default else pytest.mark.slow, id=f"{conv}-{rule}")


@needs_zennit
@pytest.mark.parametrize("conv, rule", list(_conv_rule_pairs()))
def test_conv_geometries_and_rules_match_zennit(conv, rule):
    """Grouped/depthwise, dilated with padding="same", strided with padding="valid" (PyTorch refuses
    "same" with a stride), non-square kernels and strides, Conv1d and Conv3d; every rule (w² included)."""
    model = conv_net(conv, seed=len(conv) + len(rule))
    x = torch.randn(3, *CONVS[conv][0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ours_first, z_first = RULES[rule]
    ours_second, z_second = RULES[SECOND.get(rule, rule)]
    e = LRP(model, composite=Each(ours_first, ours_second))(x, target="weighted")
    seed = bh.targets.Weighted().seed(e.logits, e.classes)
    composite = NameMapComposite([(["0"], z_first()), (["2"], z_second()), (["5"], zrules.Epsilon(1e-6))])
    xg = x.clone().requires_grad_(True)
    with composite.context(model) as modified:
        y = modified(xg)
        (want,) = torch.autograd.grad(y, xg, seed * y.detach())
    assert want.abs().max() > 0
    torch.testing.assert_close(e.attributions, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


def test_same_padding_with_an_even_kernel_is_refused_with_a_typed_error():
    """padding="same" with an even effective kernel pads asymmetrically, which the rules do not model
    (documented in check_layer): a RuleError, not a wrong number."""
    model = testing.randomize(nn.Sequential(nn.Conv2d(2, 3, 2, padding="same"), nn.Flatten(), nn.Linear(48, 3)), 0)
    with pytest.raises(RuleError, match="even effective kernel"):
        LRP(model, composite="epsilon")(torch.randn(1, 2, 4, 4, dtype=torch.float64))


# ------------------------------------------------------------------------------------ BatchNorm merge
def test_batchnorm_merge_leaves_forward_unchanged():
    model = vgg(batchnorm=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-5
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    conv, bn = model[0], model[1]
    weight, bias = merged_params(conv.weight, conv.bias, bn)
    torch.testing.assert_close(layer_forward(conv, x, weight, bias), bn(conv(x)), rtol=1e-12, atol=1e-12)
    before = testing.model_state(model)
    with torch.no_grad():
        plain = model(x)
    e = LRP(model, composite="epsilon_plus_flat")(x)
    assert torch.equal(e.logits, plain)  # the rules never replace an output
    testing.assert_same_state(model, before)


def test_batchnorm_merge_follows_data_flow():
    """A BatchNorm is merged only into the layer whose untouched output it consumes."""

    class Net(nn.Module):
        def __init__(self, inplace: bool):
            super().__init__()
            self.inplace = inplace
            self.conv, self.bn, self.head = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            z = self.conv(x)
            return self.head(self.bn(z.mul_(2.0) if self.inplace else z * 2.0).flatten(1))

    def relevance(model, merge):
        bn = MergeBatchNorm() if merge else None
        spec = [(nn.Conv2d, Epsilon(input_layer=True, bn=bn)), (nn.Linear, Epsilon(bn=bn))] + (
            [(nn.BatchNorm2d, bn)] if merge else []
        )
        x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(
            True
        )
        with bh.attach(model, spec):
            y = model(x)
            return torch.autograd.grad(y, x, torch.ones_like(y))[0]

    for inplace in (True, False):  # conv -> (x2) -> BN: the BN never consumes the conv's untouched output
        model = testing.randomize(Net(inplace), 0)
        torch.testing.assert_close(relevance(model, True), relevance(model, False), rtol=0, atol=0)
    direct = testing.randomize(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 2)), 0)
    assert not torch.allclose(relevance(direct, True), relevance(direct, False))


# ------------------------------------------------------------------------------------- properties
def _bias_free(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model


@settings(**SETTINGS)
@given(
    case=testing.cases(acts=("relu", "relu_inplace"), batchnorm=False),
    name=st.sampled_from(["epsilon", "epsilon_plus", "epsilon_plus_flat"]),
    target=st.sampled_from(["logit", "weighted", "softmax", "mean", "max"]),
)
def test_conservation_on_bias_free_relu_nets(case, name, target):
    """Σ_i R_i = Σ_c y_c v_c (= y_t for the logit target), also across residual adds and average pooling.

    (α2β1 is left out: a unit without negative contributions, z⁻ = 0, keeps only α·R of its relevance.)"""
    model = _bias_free(case.model)
    e = LRP(model, composite=name, epsilon=1e-12, stabilizer=1e-12)(case.x, target=target)
    seed = bh.targets.get(target).seed(e.logits, e.classes)
    want = (seed * e.logits).sum(1)
    got = e.attributions.flatten(1).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * (1 + e.logits.abs().max().item()))


@settings(**FEWER)
@given(case=testing.cases(batch=(1, 3)), name=st.sampled_from(sorted(COMPOSITES)))
def test_contrast_identities(case, name):
    options = dict(low=-4.0, high=4.0) if name == "epsilon_gamma_box" else {}
    testing.assert_contrast_identities(LRP(case.model, composite=name, **options), case.x, rtol=1e-8, atol=1e-12)


@settings(**FEWER)
@given(case=testing.cases(batch=(2, 4)), name=st.sampled_from(sorted(COMPOSITES)))
def test_batch_equals_single(case, name):
    options = dict(low=-4.0, high=4.0) if name == "epsilon_gamma_box" else {}
    testing.assert_batch_equals_single(LRP(case.model, composite=name, **options), case.x, rtol=1e-8, atol=1e-12)


@settings(**SETTINGS)
@given(case=testing.cases(), name=st.sampled_from(sorted(COMPOSITES)))
def test_model_left_untouched(case, name):
    model = case.model
    for p in list(model.parameters())[::2]:
        p.grad = torch.ones_like(p)
    list(model.parameters())[-1].requires_grad_(False)
    before = testing.model_state(model)
    options = dict(low=-4.0, high=4.0) if name == "epsilon_gamma_box" else {}
    e = LRP(model, composite=name, **options)(case.x, target="weighted")
    assert e.linear and e.attributions.shape == case.x.shape
    testing.assert_same_state(model, before)


def test_model_left_untouched_after_exception():
    model = vgg(batchnorm=True)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = testing.model_state(model)
    bad = LRP(model, composite="epsilon_gamma_box", low=torch.zeros(1, 5, 1, 1), high=1.0)  # 5 channels, input has 3
    with pytest.raises(RuleError, match="does not broadcast"):  # raised in the backward pass
        bad(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    testing.assert_same_state(model, before)
    with pytest.raises(RuntimeError):  # raised in the forward pass: 24 px gives the head the wrong width
        LRP(model)(torch.randn(2, 3, 24, 24, dtype=torch.float64))
    testing.assert_same_state(model, before)


# ------------------------------------------------------------------------------------------ errors
def test_rule_on_wrong_module_is_a_rule_error():
    model = vgg()
    with pytest.raises(RuleError, match="nn.Linear and nn.Conv"):
        bh.attach(model, {nn.ReLU: Epsilon()})
    with pytest.raises(RuleError, match="input layer"):
        bh.attach(model, {nn.Conv2d: Flat(input_layer=False)})
    with pytest.raises(RuleError, match="padding_mode"):
        bh.attach(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), {nn.Conv2d: ZPlus()})
    with pytest.raises(RuleError, match="BatchNorm"):
        bh.attach(model, {nn.Conv2d: MergeBatchNorm()})
    with pytest.raises(RuleError, match="no nn.Linear"):
        first_layer(nn.Sequential(nn.ReLU()))
    testing.assert_no_hooks_left(model)


def test_bad_options():
    model = vgg()
    with pytest.raises(UnknownNameError, match="epsilon_plus_flat"):
        LRP(model, composite="nope")
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        AlphaBeta(alpha=2.0, beta=2.0)


def test_rules_are_linear_and_documented():
    for rule in (Epsilon(), ZPlus(), AlphaBeta(), Gamma(), Flat(), ZBox(0.0, 1.0), MergeBatchNorm()):
        assert rule.linear
        assert type(rule).__doc__


def test_second_backward_over_one_forward_is_a_rule_error():
    """LRP rules free what they kept from forward once their backward ran (peak memory); a second backward
    over the same graph says so instead of silently using released tensors."""
    model = vgg()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    with bh.attach(model, [(nn.Conv2d, Epsilon()), (nn.Linear, Epsilon())]):
        y = model(x)
        torch.autograd.grad(y.sum(), x, retain_graph=True)
        with pytest.raises(RuleError, match="second time"):
            torch.autograd.grad(y.sum(), x)


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_peak_memory_near_a_plain_backward(name, batchnorm):
    """Tensor memory at the peak (allocator events: deterministic) stays near that of a plain forward+backward
    when activations dominate: no copies of outputs, forward state freed as the backward goes. Measured on this
    net: 1.02-1.07x with BatchNorm, 1.14-1.49x without (outputs changed by in-place ReLUs are recomputed; a
    layer's transients weigh more in a 12-layer net than in a real one); the earlier rules took 2.0-3.5x."""
    from bench.memory import peak_mib
    from bench.timing import forward_backward

    def stage(cin, cout, depth=4):  # like a real CNN: several layers per resolution, so activations add up
        layers = []
        for i in range(depth):
            layers += [
                nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1),
                *([nn.BatchNorm2d(cout)] if batchnorm else []),
                nn.ReLU(inplace=True),
            ]
        return layers

    net = nn.Sequential(
        *stage(3, 16),
        nn.MaxPool2d(2),
        *stage(16, 32),
        nn.MaxPool2d(2),
        *stage(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 4),
    )
    net = testing.randomize(net, 0).float()
    x, t = torch.rand(2, 3, 96, 96), torch.tensor([0, 1])
    method = LRP(net, composite=name, **OPTIONS.get(name, {}))
    cpu = torch.device("cpu")
    ratio = peak_mib(lambda: method(x, classes=t), cpu) / peak_mib(forward_backward(net, x, t), cpu)
    assert ratio <= 1.6, ratio
