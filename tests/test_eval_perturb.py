"""Perturbation experiment: the update rule and clamping on hand-computed cases, batching over ε,
per-sample statistics."""

import math

import pytest
import torch
from torch import nn

from backprop_hooks.eval import perturb, report


def test_step_moves_by_sign_and_clamps_to_the_box_and_the_pixel_range():
    x0 = torch.tensor([0.5, 0.999, 0.0005, 0.3, 0.5])
    x = torch.tensor([0.5, 0.999, 0.0005, 0.3, 0.502])
    phi = torch.tensor([2.0, 1.0, -7.0, 0.0, 1.0])
    out = perturb.perturb_step(x, x0, phi, step=0.002, eps=0.003)
    # +step; clamp to 1; clamp to 0; sign(0) = 0 keeps the pixel; 0.504 clamped to x0 + eps = 0.503
    torch.testing.assert_close(out, torch.tensor([0.502, 1.0, 0.0, 0.3, 0.503]))


def test_step_clamps_below_x0_minus_eps():
    x0 = torch.tensor([0.5])
    out = perturb.perturb_step(torch.tensor([0.498]), x0, torch.tensor([-1.0]), step=0.002, eps=0.003)
    torch.testing.assert_close(out, torch.tensor([0.497]))


class Linear(nn.Module):
    """y = W · flatten(x): the input gradient of y_t is W_t everywhere (a constant sign)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.fc.weight.data.copy_(weight)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_constant_gradient_reaches_x0_plus_eps_sign_in_any_number_of_steps(steps):
    torch.manual_seed(0)
    w = torch.randn(3, 1 * 2 * 2)
    model = Linear(w).eval()
    x0 = torch.tensor([[[[0.5, 0.0], [1.0, 0.2]]], [[[0.3, 0.7], [0.9994, 0.0003]]]])
    classes = torch.tensor([0, 2])
    eps = [1e-3, 3e-3]
    out = perturb.perturb(model, x0, classes, "gradient", "logit", eps, steps)
    assert out.shape == (2, *x0.shape)
    for i, e in enumerate(eps):
        expected = (x0 + e * w[classes].view(2, 1, 2, 2).sign()).clamp(0, 1)
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)


def test_stacked_eps_equal_separate_runs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x0, classes = torch.rand(3, 3, 6, 6), torch.tensor([0, 4, 2])
    both = perturb.perturb(model, x0, classes, "gradient", "weighted", [1e-2, 5e-2], 3)
    for i, e in enumerate([1e-2, 5e-2]):
        alone = perturb.perturb(model, x0, classes, "gradient", "weighted", [e], 3)[0]
        torch.testing.assert_close(both[i], alone)
        assert (both[i] - x0).abs().max() <= e + 1e-6


def test_outcome_reads_correct_probability_and_logit():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    out = perturb.outcome(logits, torch.tensor([1, 1]))
    torch.testing.assert_close(out["acc"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out["y"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(out["p"], logits.softmax(1)[:, 1])


def test_summary_is_a_per_sample_mean_with_student_t_interval():
    base = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    after = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    results = {
        "base_acc": base,
        "base_p": base * 0.5,
        "base_y": base * 2,
        "acc": after.view(1, 1, 1, 5),
        "p": after.view(1, 1, 1, 5) * 0.5,
        "y": after.view(1, 1, 1, 5) * 2,
    }
    (row,) = perturb.summarize(results, ["weighted"], [3e-3], [1])
    delta = after - base
    assert row["n"] == 5 and row["mode"] == "weighted" and row["eps"] == 3e-3 and row["steps"] == 1
    assert row["base_acc"] == pytest.approx(0.6) and row["delta_acc"] == pytest.approx(float(delta.mean()))
    assert row["delta_y"] == pytest.approx(2 * float(delta.mean()))
    half = 2.7764451051977987 * float(delta.std()) / math.sqrt(5)  # t_{0.975, 4}
    assert row["delta_acc_ci95"] == pytest.approx(half)


def test_mean_ci_ignores_nan_and_handles_tiny_samples():
    assert report.mean_ci(torch.tensor([1.0, float("nan"), 3.0]))[0] == pytest.approx(2.0)
    mean, half = report.mean_ci(torch.tensor([4.0]))
    assert mean == 4.0 and math.isnan(half)
    assert all(math.isnan(v) for v in report.mean_ci(torch.tensor([])))


def test_paired_differences_against_the_original_mode():
    acc = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]).view(2, 1, 1, 3)  # weighted, logit
    results = {"acc": acc, "p": acc * 0.5, "y": acc * 3}
    (row,) = perturb.paired(results, ["weighted", "logit"], [1e-3], [1])
    assert row["mode"] == "weighted" and row["versus"] == "logit"
    assert row["diff_acc"] == pytest.approx(1 / 3) and row["diff_y"] == pytest.approx(1.0)
    assert perturb.paired(results, ["weighted", "max"], [1e-3], [1]) == []


def test_command_line_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from backprop_hooks import cli

    base = ["--model", "digits_cnn", "--limit", "1", "--quiet", "--out", str(tmp_path / "o")]
    assert cli.main(["perturb", *base, "--method", "gradcam"]) == 2
    assert "input-space method" in capsys.readouterr().err
    assert cli.main(["perturb", *base, "--eps", "0"]) == 2
    assert cli.main(["perturb", *base, "--targets", "nonsense"]) == 2
    assert cli.main(["perturb", *base, "--data", "cub:/does/not/exist"]) == 2
    assert cli.main(["mask", *base, "--threshold", "0.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("backprop-hooks") for line in err)
    assert not (tmp_path / "o").exists()
