"""Contrast inside Captum, pytorch-grad-cam and Quantus: oracles against bh.explain and per-class identities."""

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.errors import InputError, MissingExtraError, ModelOutputError
from backprop_hooks.interop import Contrast, Potentials, grad_cam_target, quantus_explain

captum_attr = pytest.importorskip("captum.attr")

TARGETS = ["logit", "weighted", "softmax", "max"]


@pytest.fixture(scope="module")
def cnn():
    """A ReLU CNN that keeps its resolution until the pooling (3 channels, 6×6, 5 classes), float64."""
    return testing.randomize(testing.CNN(3, 6, 4, 2, 5), seed=11)


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def _per_class(attribute, seed):
    """Σ_s seed_s · attribution_s from per-class attributions ``attribute(s)`` of the plain model."""
    per_class = torch.stack([attribute(s).to(seed.dtype) for s in range(seed.shape[1])])  # (C, B, ...)
    return torch.einsum("bc,cb...->b...", seed, per_class)


def _close(got, want, rtol=1e-7):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()) + 1e-12)


# ---- Contrast: the module and its seed ---------------------------------------------------------------


def test_contrast_forward_is_the_seeded_sum_and_its_seed_is_the_targets(cnn, x):
    f = Contrast(cnn, "weighted")
    seed = f.seed(x)
    with torch.no_grad():
        y = cnn(x)
    classes = y.argmax(1)
    torch.testing.assert_close(seed, bh.targets.Weighted().seed(y, classes))
    torch.testing.assert_close(f(x, seed), (seed * y).sum(1))
    odds = torch.log(y.softmax(1).gather(1, classes[:, None])[:, 0] / (1 - y.softmax(1).max(1).values))
    torch.testing.assert_close(f.potential(x), odds)
    assert not seed.requires_grad and list(f.parameters()) == list(cnn.parameters())
    with pytest.raises(InputError, match="does not match the logits"):
        f(x, seed[:1])


def test_contrast_reads_logits_from_structured_outputs(cnn, x):
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = cnn

        def forward(self, z):
            return {"logits": self.net(z)}

    seed = Contrast(cnn, "mean").seed(x, 2)
    torch.testing.assert_close(Contrast(Wrapped(), "mean")(x, seed), Contrast(cnn, "mean")(x, seed))
    torch.testing.assert_close(Contrast(Wrapped(), "mean", logits=lambda out: out["logits"]).seed(x, 2), seed)

    class Bad(nn.Module):
        def forward(self, z):
            return [z]

    with pytest.raises(ModelOutputError, match="logits=fn"):
        Contrast(Bad()).seed(x)


# ---- Captum oracles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_captum_saliency_and_ig_through_contrast_equal_bh_explain(cnn, x, target):
    f = Contrast(cnn, target)
    classes = torch.tensor([0, 3, 4])
    seed = f.seed(x, classes)
    sal = captum_attr.Saliency(f).attribute(x, additional_forward_args=(seed,), abs=False)
    _close(sal, bh.explain(cnn, x, "gradient", target, classes=classes).attributions, 1e-10)
    ig = captum_attr.IntegratedGradients(f).attribute(
        x, additional_forward_args=(seed,), n_steps=16, method="gausslegendre", internal_batch_size=20
    )
    _close(ig, bh.explain(cnn, x, "integrated_gradients", target, classes=classes, n_steps=16).attributions, 1e-6)


def test_captum_methods_through_contrast_are_the_per_class_composition(cnn, x):
    """Linear in the seed (gradients, paths, DeepLift, layer, neuron, NoiseTunnel) or in the output (perturbations):
    the contrast attribution is Σ_s seed_s · attribution_s, exactly."""
    x = x[:2]
    f = Contrast(cnn, "weighted")
    seed = f.seed(x)
    layer = cnn.blocks[0]
    mask = (torch.arange(36).view(1, 1, 6, 6) // 9).expand(1, 3, 6, 6).contiguous()

    def seeded(make, **kw):
        torch.manual_seed(0), np.random.seed(0)
        return make(f).attribute(x, additional_forward_args=(seed,), **kw)

    def plain(make, **kw):
        def one(s):
            torch.manual_seed(0), np.random.seed(0)
            return make(cnn).attribute(x, target=s, **kw)

        return _per_class(one, seed)

    cases = [
        (captum_attr.FeatureAblation, dict(feature_mask=mask)),
        (captum_attr.Occlusion, dict(sliding_window_shapes=(3, 3, 3), strides=(3, 2, 2))),
        (captum_attr.ShapleyValueSampling, dict(feature_mask=mask, n_samples=3)),
        (captum_attr.DeepLift, dict(baselines=0.1 * x)),
        (captum_attr.GradientShap, dict(baselines=torch.zeros(2, 3, 6, 6, dtype=x.dtype), n_samples=3)),
        (lambda m: captum_attr.NoiseTunnel(captum_attr.Saliency(m)), dict(nt_samples=4, stdevs=0.2, abs=False)),
        (lambda m: captum_attr.LayerGradCam(m, layer), dict()),
        (lambda m: captum_attr.LayerConductance(m, layer), dict(n_steps=8)),
        (lambda m: captum_attr.NeuronConductance(m, layer), dict(neuron_selector=(1, 2, 3), n_steps=8)),
    ]
    for make, kw in cases:
        got = seeded(make, **kw)
        _close(got.to(seed.dtype), plain(make, **kw), 1e-9 if got.dtype == torch.float64 else 1e-5)


def test_captum_perturbation_on_potentials_measures_the_contrast_itself(cnn, x):
    """FeatureAblation of Potentials(model, "weighted") at class t is the drop of the log-odds."""
    mask = (torch.arange(36).view(1, 1, 6, 6) >= 18).long().expand(1, 3, 6, 6)
    classes = torch.tensor([1, 2, 0])
    got = captum_attr.FeatureAblation(Potentials(cnn, "weighted")).attribute(x, target=classes, feature_mask=mask)
    w = bh.targets.Weighted()
    with torch.no_grad():
        ablated = cnn(torch.where(mask.bool(), torch.zeros_like(x), x))
        want = w.potential(cnn(x), classes) - w.potential(ablated, classes)
    torch.testing.assert_close(got[:, 0, 5, 5], want)
    with torch.no_grad():
        torch.testing.assert_close(Potentials(cnn, "logit")(x), cnn(x))


def test_captum_deeplift_convergence_delta_is_zero(cnn, x):
    f = Contrast(cnn, "weighted")
    seed = f.seed(x)
    for make in (captum_attr.DeepLift, captum_attr.IntegratedGradients):
        _, delta = make(f).attribute(
            x, baselines=0.1 * x, additional_forward_args=(seed,), return_convergence_delta=True
        )
        assert delta.abs().max() < (1e-10 if make is captum_attr.DeepLift else 1e-3), (make, delta)


@pytest.mark.parametrize("target", ["weighted", "logit", "max"])
def test_captum_lrp_through_contrast_equals_bh_lrp_epsilon(cnn, x, target):
    """The head carries Captum's z-rule: the relevance at the logits is seed ⊙ y, as in bh's lrp."""
    f = Contrast(cnn, target)
    seed = f.seed(x)
    lrp = captum_attr.LRP(f)
    got = lrp.attribute(x, additional_forward_args=(seed,))
    again = lrp.attribute(x, additional_forward_args=(seed,))  # the head's rule survives Captum's cleanup
    want = bh.explain(cnn, x, "lrp", target, composite="epsilon", epsilon=1e-9).attributions
    _close(got, want, 1e-6)
    torch.testing.assert_close(again, got)
    assert not hasattr(cnn.stem[0], "rule")  # Captum cleaned the model's own layers
    testing.assert_no_hooks_left(cnn)


# ---- pytorch-grad-cam ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["weighted", "logit", "mean", bh.targets.Versus(2)])
def test_pytorch_grad_cam_gradcam_with_our_target_equals_bh_gradcam(cnn, x, target):
    """The layer keeps the input's 6×6 grid, so the library's resize is the identity; it min-max scales (twice)."""
    from pytorch_grad_cam import GradCAM

    classes, model, xf = [0, 3, 4], copy.deepcopy(cnn).float(), x.float()  # the library works in float32
    with GradCAM(model, target_layers=[model.blocks[-1]]) as cam:
        got = cam(xf, targets=[grad_cam_target(target, c) for c in classes])
    e = bh.explain(model, xf, "gradcam", target, classes=torch.tensor(classes), layer="blocks.1", relu=True)
    want = e.attributions
    for _ in range(2):  # the library min-max scales per layer, then again after merging layers
        want = want - want.flatten(1).amin(1)[:, None, None]
        want = want / (1e-7 + want.flatten(1).amax(1)[:, None, None])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_grad_cam_target_value_is_the_potential_and_score_cams_run(cnn, x):
    from pytorch_grad_cam import AblationCAM, ScoreCAM

    y = torch.randn(4, 5, dtype=torch.float64)
    t = grad_cam_target("weighted", 3)
    torch.testing.assert_close(t(y[1]), bh.targets.Weighted().potential(y[1:2], torch.tensor([3]))[0])
    torch.testing.assert_close(t(y), bh.targets.Weighted().potential(y, torch.full((4,), 3)))
    model = copy.deepcopy(cnn).float()
    for kind in (ScoreCAM, AblationCAM):
        with kind(model, target_layers=[model.blocks[-1]]) as cam:
            maps = cam(x.float(), targets=[grad_cam_target("weighted", c) for c in (0, 3, 4)])
        assert maps.shape == (3, 6, 6) and np.isfinite(maps).all()


# ---- Quantus --------------------------------------------------------------------------------------------


def test_quantus_explain_follows_the_explain_func_contract(cnn, x):
    pytest.importorskip("quantus")
    explain = quantus_explain(method="gradient", target="weighted")
    classes = np.array([0, 3, 4])
    a = explain(model=Potentials(cnn, "weighted"), inputs=x.numpy(), targets=classes, device="cpu")
    want = bh.explain(cnn, x, "gradient", "weighted", classes=torch.as_tensor(classes)).attributions
    assert isinstance(a, np.ndarray) and a.shape == x.shape
    np.testing.assert_allclose(a, want.float().numpy(), rtol=1e-6)
    summed = quantus_explain(method="gradient", target="weighted", channels="sum")(cnn, x.numpy(), classes)
    assert summed.shape == (3, 1, 6, 6)
    cam = quantus_explain(method="gradcam", target="max", layer="blocks.1")(cnn, x.numpy(), classes)
    assert cam.shape == (3, 1, 6, 6)
    with pytest.raises(bh.errors.OptionError):
        quantus_explain(channels="mean")


def test_quantus_metric_runs_with_our_explain_func_and_a_potential_head(cnn, x):
    quantus = pytest.importorskip("quantus")
    metric = quantus.RegionPerturbation(patch_size=3, regions_evaluation=4, disable_warnings=True)
    scores = metric(
        model=Potentials(copy.deepcopy(cnn).float(), "weighted"),
        x_batch=x.float().numpy(),
        y_batch=np.array([0, 3, 4]),
        explain_func=quantus_explain(method="input_x_gradient", target="weighted"),
        device="cpu",
        softmax=False,  # measure the potential itself (Quantus' default would apply a softmax to it)
    )
    assert len(scores) == 3 and all(len(s) == 4 and np.isfinite(s).all() for s in scores)


# ---- optional dependencies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, call",
    [
        ("pytorch_grad_cam", lambda: grad_cam_target("weighted", 0)),
        ("quantus", lambda: quantus_explain()),
        ("captum", lambda: Contrast(nn.Linear(2, 2)).head.rule),
    ],
)
def test_a_missing_library_names_the_extra(monkeypatch, module, call):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=r"backprop_hooks\[interop\]"):
        call()


# ---- real models (slow) -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_digits_cnn_through_captum_and_pytorch_grad_cam_equals_bh():
    """The bundled digits CNN (BatchNorm, max pooling, Flatten): Captum IG and LayerGradCam through Contrast,
    and pytorch-grad-cam's GradCAM with our target, against bh.explain."""
    from pytorch_grad_cam import GradCAM

    from backprop_hooks import models

    model = models.create("digits_cnn")
    x, t = models.digits("test")
    x, t = x[:6], t[:6]
    layer_name = model.default_layer
    layer = bh.methods.get_module(model, layer_name)
    for target in ("weighted", "max"):
        f = Contrast(model, target)
        seed = f.seed(x, t)
        ig = captum_attr.IntegratedGradients(f).attribute(x, additional_forward_args=(seed,), n_steps=24)
        want = bh.explain(model, x, "integrated_gradients", target, classes=t, n_steps=24).attributions
        _close(ig, want, 1e-4)
        cam = captum_attr.LayerGradCam(f, layer).attribute(x, additional_forward_args=(seed,))
        want = bh.explain(model, x, "gradcam", target, classes=t, layer=layer_name).attributions
        _close(cam[:, 0], want, 1e-4)
        with GradCAM(model, target_layers=[layer]) as gc:
            heat = gc(x, targets=[grad_cam_target(target, c) for c in t.tolist()])
        e = bh.explain(model, x, "gradcam", target, classes=t, layer=layer_name, relu=True)
        maps = e.maps - e.maps.flatten(1).amin(1)[:, None, None]
        maps = maps / maps.flatten(1).amax(1)[:, None, None]
        # the library resizes with OpenCV, we upsample with torch (both bilinear, half-pixel centres)
        assert np.corrcoef(heat.reshape(-1), maps.numpy().reshape(-1))[0, 1] > 0.99


@pytest.mark.slow
def test_faithfulness_command_writes_its_tables(tmp_path):
    pytest.importorskip("quantus")
    from backprop_hooks import cli

    out = tmp_path / "run"
    code = cli.main(
        ["faithfulness", "--limit", "4", "--methods", "gradient", "--explained", "weighted", "--measured", "weighted"]
        + ["--metrics", "region_perturbation", "road", "--quiet", "--out", str(out)]
    )
    assert code == 0
    text = (out / "results.md").read_text()
    assert "| gradient | weighted | region_perturbation | log-odds |" in text
    import json

    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["explained"] for r in rows} == {"logit", "weighted"} and all(r["n"] == 4 for r in rows)
