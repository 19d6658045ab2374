"""The public test helpers fail where they should: degenerate cases, non-linear methods, wrong methods."""

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import backprop_hooks as bh
from backprop_hooks import methods, testing


def relu_cnn(seed=0):
    return testing.randomize(testing.CNN(2, 6, 4, 2, 4), seed=seed)


def x_for(model, n=2, seed=0):
    return torch.randn((n, *model.input_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Zeros(methods.Gradient):
    """A broken method: all-zero attributions, for every target."""

    name = "zeros"

    def attribute(self, x, logits, seed):
        return torch.zeros_like(x)


class LogitOnly(methods.Gradient):
    """A broken method: ignores the target and always explains the logit."""

    name = "logit_only"

    def attribute(self, x, logits, seed):
        onehot = torch.nn.functional.one_hot(seed.argmax(1), seed.shape[1]).to(seed.dtype)
        return super().attribute(x, logits, onehot)


def test_identities_hold_for_the_gradient_and_fail_for_broken_methods():
    model, x = relu_cnn(), x_for(relu_cnn())
    testing.assert_contrast_identities(methods.Gradient(model), x, rtol=1e-9, atol=1e-12)
    with pytest.raises(AssertionError, match="every per-class attribution is zero"):
        testing.assert_contrast_identities(Zeros(model), x)
    with pytest.raises(AssertionError, match="target 'weighted' differs"):
        testing.assert_contrast_identities(LogitOnly(model), x)


@pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")
@pytest.mark.parametrize("name, options", [("guided_backprop", {}), ("deconvnet", {}), ("gradcam", {"relu": True})])
def test_identities_fail_on_non_linear_methods(name, options):
    model = relu_cnn(seed=3)
    with pytest.raises(AssertionError, match="differs from its explicit per-class composition"):
        testing.assert_contrast_identities(methods.get(name)(model, **options), x_for(model, 3, seed=1))


def test_a_dead_network_is_degenerate_not_a_pass():
    model = relu_cnn()
    with torch.no_grad():
        model.stem[0].bias.fill_(-1e3)  # every unit of the first layer inactive: ∂y/∂x = 0
    x = x_for(model)
    assert bh.explain(model, x, "gradient").attributions.abs().max() == 0
    with pytest.raises(AssertionError, match="zero"):
        testing.assert_contrast_identities(methods.Gradient(model), x)
    with pytest.raises(AssertionError, match="zero"):
        testing.assert_batch_equals_single(methods.Gradient(model), x)


def test_inside_hypothesis_a_dead_network_is_rejected_not_passed():
    from hypothesis.errors import FailedHealthCheck, Unsatisfiable

    @settings(max_examples=2, database=None)
    @given(testing.cases(kinds=("mlp",), acts=("relu",)))
    def every_example_dead(case):
        with torch.no_grad():
            case.model.stem.bias.fill_(-1e3)
        testing.assert_contrast_identities(methods.Gradient(case.model), case.x)

    with pytest.raises((Unsatisfiable, FailedHealthCheck)):  # every example rejected: none passes
        every_example_dead()


def test_batch_helper_fails_when_samples_interact():
    class BatchMean(nn.Module):  # mixes the samples of a batch: batch != single
        def __init__(self):
            super().__init__()
            self.net = relu_cnn()
            self.num_classes, self.input_shape = 4, self.net.input_shape

        def forward(self, x):
            return self.net(x - x.mean(0, keepdim=True) * 0.5)

    model = BatchMean().eval()
    with pytest.raises(AssertionError):
        testing.assert_batch_equals_single(methods.Gradient(model), x_for(model, 3))


def test_pinned_budgets_follow_the_loaded_profile():
    """testing.examples(n): n under the default profile (25), 12 n under "thorough" (300)."""
    from hypothesis import settings

    current = settings.default
    try:
        settings.load_profile("default")
        assert testing.examples(15) == 15 and testing.examples(6) == 6
        settings.load_profile("thorough")
        assert testing.examples(15) == 180 and testing.examples(1) == 12
    finally:
        settings.register_profile("_restored", current)
        settings.load_profile("_restored")
