"""LRP on torchvision models (random weights): runs, matches Zennit with its canonizers, leaves no trace.

ResNet's residual ``out += identity`` is a functional add: the back-propagated quantity is the gradient,
so each branch gets ``a ⊙ g`` and the relevance splits in proportion to the branches' contributions,
which is what Zennit's ResNetCanonizer achieves by swapping in a ``Sum`` module with its ``Norm`` rule.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import backprop_hooks as bh
from backprop_hooks import testing

try:  # Zennit is an oracle: without it only the tests comparing with it are skipped
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
except ImportError:  # pragma: no cover
    EpsilonPlusFlat = ResNetCanonizer = VGGCanonizer = None
needs_zennit = pytest.mark.skipif(EpsilonPlusFlat is None, reason="needs zennit (an oracle)")


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval().double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # BatchNorm statistics away from the identity, so that merging matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen, dtype=torch.float64))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen, dtype=torch.float64))
                m.eps = 0.0  # Zennit's merged BN computes x / sqrt(1 + eps): exact only for eps = 0
    return model


@needs_zennit
@pytest.mark.slow
@pytest.mark.parametrize("arch,canonizer", [("vgg11_bn", VGGCanonizer), ("resnet18", ResNetCanonizer)])
def test_torchvision_matches_zennit(arch, canonizer):
    model = _model(arch)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = testing.model_state(model)
    e = bh.explain(model, x, method="lrp", composite="epsilon_plus_flat", target="weighted")
    testing.assert_same_state(model, before)
    assert e.linear and e.attributions.shape == x.shape and torch.isfinite(e.attributions).all()
    seed = bh.targets.Weighted().seed(e.logits, e.classes)
    xg = x.clone().requires_grad_(True)
    with EpsilonPlusFlat(canonizers=[canonizer()]).context(model) as modified:
        y = modified(xg)
        (want,) = torch.autograd.grad(y, xg, seed * y.detach())
    # Zennit stabilises average pooling and the residual sums with 1e-6 (Norm rule); we use their gradient
    torch.testing.assert_close(e.attributions, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg11_bn", "resnet18"])
def test_torchvision_float32_every_composite(arch):
    model = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.rand(1, 3, 32, 32)
    for name in ("epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1"):
        e = bh.explain(model, x, method="lrp", composite=name, target="weighted")
        assert torch.isfinite(e.attributions).all()
    e = bh.explain(model, x, method="lrp", composite="epsilon_gamma_box", low=0.0, high=1.0)
    assert e.maps.shape == (1, 32, 32)
    testing.assert_no_hooks_left(model)


def test_resnet18_runs_and_leaves_no_trace():
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    before = testing.model_state(model)
    e = bh.explain(model, x, method="lrp", composite="epsilon_plus_flat", target="weighted")
    testing.assert_same_state(model, before)
    assert e.linear and e.attributions.shape == x.shape and torch.isfinite(e.attributions).all()
