"""Potentials: every seed is the gradient of a true scalar (no weight held constant but max's s*); the weighted
seed is the gradient of the log-odds; pointwise Integrated Gradients is complete against the potential."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import backprop_hooks as bh
from backprop_hooks import targets, testing

NAMES = ["logit", "softmax", "log_softmax", "weighted", "mean", "max"]


def _with_classes(**kw):
    return testing.logits(dtype=torch.float64, **kw).flatmap(lambda y: st.tuples(st.just(y), testing.classes_for(y)))


@given(_with_classes(), st.sampled_from(NAMES + ["versus"]))
def test_gradient_of_every_potential_is_its_seed(case, name):
    """∂P/∂y = seed, with autograd through the whole potential (α of weighted not held)."""
    y, t = case
    target = targets.Versus((t + 1) % y.shape[1]) if name == "versus" else targets.get(name)
    y = y.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(target.potential(y, t).sum(), y)
    torch.testing.assert_close(g, target.seed(y.detach(), t), rtol=1e-9, atol=1e-12)


@given(_with_classes(scale=(1e-3, 8.0)))
def test_weighted_potential_is_the_log_odds(case):
    y, t = case
    p_t = y.softmax(1).gather(1, t[:, None])[:, 0]
    odds = torch.log(p_t / (1 - p_t))
    torch.testing.assert_close(targets.get("weighted").potential(y, t), odds, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(targets.get("softmax").potential(y, t), p_t, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(targets.get("log_softmax").potential(y, t), p_t.log(), rtol=1e-12, atol=1e-12)


def test_potentials_are_stable_at_saturation():
    """p_t → 1 (1 − p_t underflows) and p_t → 0: the log-odds stay finite and exact, in float32 too."""
    y = torch.tensor([[200.0, 0.0, -5.0], [-300.0, 0.0, 1.0]])
    t = torch.tensor([0, 0])
    got = targets.get("weighted").potential(y, t)
    want = torch.tensor([200.0 - math.log(1 + math.exp(-5.0)), -300.0 - (1.0 + math.log(1 + math.exp(-1.0)))])
    torch.testing.assert_close(got, want)
    for name in NAMES:
        yy = y.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(targets.get(name).potential(yy, t).sum(), yy)
        assert torch.isfinite(targets.get(name).potential(y, t)).all() and torch.isfinite(g).all(), name


def test_max_potential_holds_the_runner_up():
    y = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    assert float(targets.get("max").potential(y, torch.tensor([0]))) == 1.0
    assert float(targets.get("mean").potential(y, torch.tensor([0]))) == 1.5


def test_softmax_chain_rule_through_the_log_odds():
    """p_t = sigmoid(log-odds), hence the identity φ(p_t) = p_t (1 − p_t) φ_weighted."""
    y = torch.randn(4, 7, dtype=torch.float64)
    t = torch.tensor([0, 3, 6, 2])
    odds = targets.get("weighted").potential(y, t)
    torch.testing.assert_close(torch.sigmoid(odds), targets.get("softmax").potential(y, t), rtol=1e-12, atol=1e-15)


def test_a_target_without_potential_says_so():
    class Mine(targets.Target):
        name = "mine"

        def seed(self, logits, classes):
            return torch.ones_like(logits)

    with pytest.raises(NotImplementedError, match="Mine defines no potential"):
        Mine().potential(torch.zeros(1, 3), torch.tensor([0]))
    model = testing.randomize(testing.MLP(4, 5, 1, 3), seed=0)
    e = bh.explain(model, torch.randn(2, 4, dtype=torch.float64), "integrated_gradients", Mine(), n_steps=2)
    assert "potential" not in e.extras


@settings(max_examples=8, deadline=None)
@given(testing.cases(acts=("gelu",)), st.sampled_from(["logit", "softmax", "log_softmax", "weighted", "mean"]))
@pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")
def test_pointwise_integrated_gradients_is_complete_against_the_potential(case, name):
    """Σ φ = P(x) − P(x0); for weighted, P is the log-odds (smooth GELU nets: Gauss–Legendre converges)."""
    x, tgt = case.x, targets.get(name)
    e = bh.explain(case.model, x, "integrated_gradients", name, n_steps=96, pointwise=True)
    with torch.no_grad():
        y, y0 = case.model(x), case.model(torch.zeros_like(x))
    want = tgt.potential(y, e.classes) - tgt.potential(y0, e.classes)
    torch.testing.assert_close(e.extras["potential"], tgt.potential(y, e.classes))
    got = e.attributions.flatten(1).sum(1)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()) + 1e-7)


def test_pointwise_ig_of_weighted_is_not_complete_against_the_held_alpha_objective():
    """Pointwise IG integrates the log-odds, not the linearised contrast v·y with α held at x."""
    model = testing.randomize(testing.MLP(6, 8, 2, 5, act="gelu"), seed=4)
    x = 3 * torch.randn(3, 6, dtype=torch.float64)
    with pytest.warns(bh.errors.NonLinearContrastWarning):
        e = bh.explain(model, x, "integrated_gradients", "weighted", n_steps=128, pointwise=True)
    with torch.no_grad():
        y, y0 = model(x), model(torch.zeros_like(x))
    w = targets.get("weighted")
    got = e.attributions.flatten(1).sum(1)
    odds = w.potential(y, e.classes) - w.potential(y0, e.classes)
    torch.testing.assert_close(got, odds, rtol=1e-4, atol=1e-6)
    held = (w.seed(y, e.classes) * (y - y0)).sum(1)
    assert (got - held).abs().max() > 1e-3
