"""Gradient-family methods: contrast identities on random networks, batching, Captum oracles, IG completeness."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import backprop_hooks as bh
from backprop_hooks import methods, testing

GRADIENT_METHODS = {
    "gradient": {},
    "input_x_gradient": {},
    "smoothgrad": {"n_samples": 3, "seed": 0},
    "integrated_gradients": {"n_steps": 4},
}


@given(testing.cases(), st.sampled_from(sorted(GRADIENT_METHODS)))
def test_contrast_identities(case, name):
    """weighted = φ_t − Σ α_s φ_s, softmax = p_t(1−p_t)·weighted, log_softmax = (1−p_t)·weighted, mean/max/versus."""
    method = methods.get(name)(case.model, **GRADIENT_METHODS[name])
    testing.assert_contrast_identities(method, case.x, rtol=1e-9, atol=1e-12)


@given(
    testing.cases(batch=(2, 4)),
    st.sampled_from(sorted(GRADIENT_METHODS)),
    st.sampled_from(["weighted", "softmax", "max"]),
)
def test_batch_equals_single(case, name, target):
    options = dict(GRADIENT_METHODS[name])
    if name == "smoothgrad":  # noise is drawn per batch: compare with zero noise
        options["noise_level"] = 0.0
    testing.assert_batch_equals_single(
        methods.get(name)(case.model, **options), case.x, target=target, rtol=1e-9, atol=1e-12
    )


@settings(max_examples=testing.examples(10))
@given(testing.cases(acts=("gelu",)), st.sampled_from(["logit", "softmax", "log_softmax", "weighted"]))
@pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")
def test_integrated_gradients_completeness(case, target):
    """Σ IG = f(x) − f(x0): with fixed seeds f = v·y (v the seed at x); pointwise, f is the target's potential
    (for weighted, the log-odds: its seed at every point is the gradient of log(p_t/(1−p_t))). Smooth (GELU)
    networks, so that Gauss–Legendre quadrature converges (kinks of ReLU nets limit it)."""
    x = case.x
    tgt = bh.targets.get(target)
    with torch.no_grad():
        y, y0 = case.model(x), case.model(torch.zeros_like(x))
    for pointwise in (False, True):
        e = bh.explain(case.model, x, "integrated_gradients", target, n_steps=96, pointwise=pointwise)
        if pointwise:
            want = tgt.potential(y, e.classes) - tgt.potential(y0, e.classes)
        else:
            want = (tgt.seed(y, e.classes) * (y - y0)).sum(1)
        got = e.attributions.flatten(1).sum(1)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()) + 1e-7)


def test_integrated_gradients_memory_bound_gives_the_same_result():
    model = testing.randomize(testing.CNN(3, 6, 4, 2, 5), seed=3)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    full = bh.explain(model, x, "integrated_gradients", "weighted", n_steps=10)
    chunked = bh.explain(model, x, "integrated_gradients", "weighted", n_steps=10, internal_batch_size=7)
    torch.testing.assert_close(chunked.attributions, full.attributions, rtol=1e-12, atol=1e-14)


def test_smoothgrad_is_reproducible_and_averages_noisy_gradients():
    model = testing.randomize(testing.MLP(5, 6, 2, 4), seed=1)
    x = torch.randn(2, 5, dtype=torch.float64)
    a = bh.explain(model, x, "smoothgrad", "mean", n_samples=6, seed=7)
    b = bh.explain(model, x, "smoothgrad", "mean", n_samples=6, seed=7)
    assert torch.equal(a.attributions, b.attributions)
    noise = torch.randn((6, *x.shape), generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    sigma = 0.15 * (x.amax(1) - x.amin(1))
    want = torch.stack(
        [bh.explain(model, x + sigma[:, None] * n, "gradient", "mean", classes=a.classes).attributions for n in noise]
    ).mean(0)
    torch.testing.assert_close(a.attributions, want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------- Captum oracles
@pytest.fixture(scope="module")
def captum_attr():
    """Captum is an oracle: without it only the tests that use it are skipped, not the properties above."""
    return pytest.importorskip("captum.attr")


@pytest.fixture(scope="module")
def cnn_case():
    model = testing.randomize(testing.CNN(3, 8, 5, 2, 6, act="relu_inplace", batchnorm=True, residual=True), seed=11)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return model, x, torch.tensor([0, 3, 5, 1])


def test_gradient_equals_captum_saliency(cnn_case, captum_attr):
    model, x, t = cnn_case
    want = captum_attr.Saliency(model).attribute(x, target=t, abs=False)
    torch.testing.assert_close(bh.explain(model, x, "gradient", classes=t).attributions, want, rtol=1e-10, atol=1e-12)


def test_input_x_gradient_equals_captum(cnn_case, captum_attr):
    model, x, t = cnn_case
    want = captum_attr.InputXGradient(model).attribute(x, target=t)
    torch.testing.assert_close(
        bh.explain(model, x, "input_x_gradient", classes=t).attributions, want, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize(
    "rule", ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]
)
def test_integrated_gradients_equals_captum(cnn_case, rule, captum_attr):
    model, x, t = cnn_case
    baseline = torch.full_like(x, 0.25)
    want = captum_attr.IntegratedGradients(model).attribute(x, baselines=baseline, target=t, n_steps=20, method=rule)
    got = bh.explain(model, x, "integrated_gradients", classes=t, n_steps=20, quadrature=rule, baseline=0.25)
    if rule == "riemann_trapezoid":
        # Captum's trapezoid weights are 1/n with halved ends (they sum to 1 − 1/n) on nodes linspace(0, 1, n);
        # the trapezoid rule on those nodes has weights 1/(n−1) with halved ends (summing to 1).
        want = want * 20 / 19
    # Captum casts its quadrature weights to float32 (integrated_gradients.py: step_sizes ... .float()),
    # so agreement is to float32 precision even in float64.
    torch.testing.assert_close(got.attributions, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n", [1, 5, 50, 200])
def test_gauss_legendre_nodes_and_weights(n):
    np = pytest.importorskip("numpy")
    nodes, weights = np.polynomial.legendre.leggauss(n)
    a, w = methods.path_rule("gausslegendre", n)
    torch.testing.assert_close(a, torch.from_numpy((nodes + 1) / 2), rtol=0, atol=1e-14)
    torch.testing.assert_close(w, torch.from_numpy(weights / 2), rtol=0, atol=1e-14)


def test_pointwise_softmax_ig_equals_captum_on_softmax_output(cnn_case, captum_attr):
    model, x, t = cnn_case
    probs = nn.Sequential(model, nn.Softmax(dim=1))
    want = captum_attr.IntegratedGradients(probs).attribute(x, target=t, n_steps=16)
    with pytest.warns(bh.errors.NonLinearContrastWarning):
        got = bh.explain(model, x, "integrated_gradients", "softmax", classes=t, n_steps=16, pointwise=True)
    torch.testing.assert_close(got.attributions, want, rtol=1e-6, atol=1e-10)  # Captum's float32 weights
    assert not got.linear


def test_gradient_contrast_equals_captum_on_a_contrast_head(cnn_case, captum_attr):
    """Captum needs a model whose output is the contrast; the seed gives it from the plain model."""
    model, x, t = cnn_case

    class MeanContrastHead(nn.Module):
        def forward(self, y):
            c = y.shape[1]
            return y * (c / (c - 1)) - y.sum(1, keepdim=True) / (c - 1)  # y_t − mean_{s≠t} y_s for every t

    want = captum_attr.Saliency(nn.Sequential(model, MeanContrastHead())).attribute(x, target=t, abs=False)
    torch.testing.assert_close(
        bh.explain(model, x, "gradient", "mean", classes=t).attributions, want, rtol=1e-9, atol=1e-12
    )


def test_methods_leave_no_trace(cnn_case):
    model, x, t = cnn_case
    before = testing.model_state(model)
    for name, options in GRADIENT_METHODS.items():
        bh.explain(model, x, name, "weighted", **options)
    testing.assert_same_state(model, before)


def test_available_and_explanation_fields(cnn_case):
    model, x, _ = cnn_case
    assert {"gradient", "input_x_gradient", "smoothgrad", "integrated_gradients"} <= set(bh.methods.available())
    e = bh.explain(model, x, "gradient", "weighted")
    assert e.method == "gradient" and e.target == "weighted" and e.linear
    assert e.attributions.shape == x.shape and e.maps.shape == (4, 8, 8)
    torch.testing.assert_close(e.maps, e.attributions.sum(1))
    assert e.logits.shape == (4, 6) and e.classes.tolist() == e.logits.argmax(1).tolist()
    assert e.attributions.dtype == x.dtype and not e.attributions.requires_grad
