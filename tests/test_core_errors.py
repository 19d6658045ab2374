"""Bad input gets a clear, typed error that says what was wrong and what would be right."""

import warnings

import pytest
import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks import errors, testing


@pytest.fixture
def model():
    return testing.randomize(testing.CNN(3, 6, 3, 1, 4), seed=0, dtype=torch.float32)


@pytest.fixture
def x():
    return torch.rand(2, 3, 6, 6)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.ones(2, 3, 6, 6, dtype=torch.long), "floating-point"),
        (torch.ones(6), "batch dimension"),
        (torch.ones(0, 3, 6, 6), "empty batch"),
        (torch.full((2, 3, 6, 6), float("nan")), "NaN or Inf"),
        (torch.full((2, 3, 6, 6), float("inf")), "NaN or Inf"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_bad_inputs(model, bad, match):
    with pytest.raises(errors.InputError, match=match):
        bh.explain(model, bad)


@pytest.mark.parametrize(
    "classes, match",
    [
        (4, "index 4 is out of range; the model has 4 classes"),
        (-1, "-1 is out of range"),
        (torch.tensor([0, 1, 2]), "shape \\(2,\\)"),
        (torch.tensor([0.5, 1.0]), "integers"),
        ("cat", "must be an int"),
    ],
)
def test_bad_classes(model, x, classes, match):
    with pytest.raises(errors.ClassIndexError, match=match):
        bh.explain(model, x, classes=classes)


def test_unknown_names(model, x):
    with pytest.raises(errors.UnknownNameError, match="unknown method 'gradcma'; available: .*'gradient'"):
        bh.explain(model, x, method="gradcma")
    with pytest.raises(errors.UnknownNameError, match="unknown target 'softmx'; accepted: 'logit', 'softmax'"):
        bh.explain(model, x, target="softmx")
    with pytest.raises(errors.UnknownNameError, match="layer 'blocks.9' is not a module.*close matches: 'blocks.0'"):
        bh.methods.get_module(model, "blocks.9")


def test_model_output_must_be_batch_by_classes(x):
    with pytest.raises(errors.ModelOutputError, match="shape \\(B, C\\) = \\(2, C\\), got shape \\(2, 4, 1\\)"):
        bh.explain(nn.Sequential(nn.Flatten(), nn.Linear(108, 4), nn.Unflatten(1, (4, 1))), x)
    with pytest.raises(errors.ModelOutputError, match="got tuple"):
        bh.explain(nn.Sequential(nn.Flatten(), nn.Linear(108, 4), Tuple()), x)
    with pytest.raises(errors.ModelOutputError, match="\\(2, C\\), got shape \\(1, 4\\)"):
        bh.explain(nn.Sequential(nn.Flatten(), nn.Linear(108, 4), First()), x)


class Tuple(nn.Module):
    def forward(self, y):
        return y, y


class First(nn.Module):
    def forward(self, y):
        return y[:1]


def test_baseline_batch_mismatch(model, x):
    with pytest.raises(
        errors.InputError,
        match="baseline of shape \\(3, 3, 6, 6\\) does not broadcast to the input's shape \\(2, 3, 6, 6\\)",
    ):
        bh.explain(model, x, "integrated_gradients", baseline=torch.zeros(3, 3, 6, 6))


def test_errors_are_also_builtin_exceptions(model, x):
    with pytest.raises(ValueError):
        bh.explain(model, x, method="nope")
    assert issubclass(errors.RuleError, RuntimeError) and issubclass(errors.SelectorError, errors.BackpropHooksError)


def test_bad_options(model, x):
    with pytest.raises(ValueError, match="unknown quadrature 'simpson'"):
        bh.explain(model, x, "integrated_gradients", quadrature="simpson")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        bh.methods.Gradient(lambda t: t)


def test_training_mode_is_warned_not_changed(x):
    model = testing.randomize(testing.CNN(3, 6, 3, 1, 4, batchnorm=True), seed=0, dtype=torch.float32).train()
    with pytest.warns(bh.errors.TrainingModeWarning, match="blocks.0.1 \\(batch statistics\\).*call model.eval\\(\\)"):
        bh.explain(model, x)
    assert model.training


def test_training_mode_without_dropout_or_batch_statistics_is_not_warned(model, x):
    model.train()  # what gradient checkpointing needs: training mode computes what eval mode computes
    with warnings.catch_warnings():
        warnings.simplefilter("error", bh.errors.TrainingModeWarning)
        e = bh.explain(model, x)
    assert model.training
    torch.testing.assert_close(e.attributions, bh.explain(model.eval(), x).attributions, rtol=0, atol=0)
