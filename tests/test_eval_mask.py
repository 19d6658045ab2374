"""Masking experiment: the equal-count rule, baselines, the relative probability, the batched job."""

import pytest
import torch
from torch import nn

from backprop_hooks.eval import mask


def test_equal_count_rule_by_hand():
    original = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    weighted = torch.tensor([[5.0, -1.0, -2.0, -3.0]])
    keep_o, keep_w, k = mask.equal_count_keep(original, weighted, "positive")
    assert k.tolist() == [1]  # min(3 positive, 1 positive)
    assert keep_o.tolist() == [[False, False, True, False]] and keep_w.tolist() == [[True, False, False, False]]
    keep_o, keep_w, k = mask.equal_count_keep(original, weighted, "negative")
    assert k.tolist() == [1]  # min(1 negative, 3 negative)
    assert keep_o.tolist() == [[False, False, False, True]] and keep_w.tolist() == [[False, False, False, True]]


@pytest.mark.parametrize("features", ["positive", "negative"])
def test_equal_count_rule_on_random_maps(features):
    torch.manual_seed(0)
    original = torch.randn(6, 9, 7) + torch.linspace(-1, 1, 6).view(6, 1, 1)
    weighted = torch.randn(6, 9, 7) - torch.linspace(-1, 1, 6).view(6, 1, 1)
    original[0] = weighted[0].abs() * -1  # a map without positive pixels: k = 0 for "positive"
    keep_o, keep_w, k = mask.equal_count_keep(original, weighted, features)
    sign = 1 if features == "positive" else -1
    counts = lambda m: (sign * m > 0).flatten(1).sum(1)  # noqa: E731
    assert torch.equal(k, torch.minimum(counts(original), counts(weighted)))
    # both maps change exactly the same number of pixels, per sample
    assert torch.equal(keep_o.flatten(1).sum(1), k) and torch.equal(keep_w.flatten(1).sum(1), k)
    # kept pixels carry the requested sign only, and they are the top-ranked ones
    assert bool((sign * original[keep_o] > 0).all()) and bool((sign * weighted[keep_w] > 0).all())
    for m, keep in ((original, keep_o), (weighted, keep_w)):
        for b in range(6):
            if 0 < k[b] < m[b].numel():
                assert (sign * m[b][keep[b]]).min() >= (sign * m[b][~keep[b]]).max()


def test_blur_parameters_scale_with_the_image():
    assert mask.blur_parameters(224) == (101, 15.0)
    kernel, sigma = mask.blur_parameters(32)
    assert kernel == 15 and sigma == pytest.approx(15 * 32 / 224)
    assert mask.blur_parameters(8)[0] % 2 == 1


def test_baselines():
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(mask.baseline(x, "zeros"), torch.zeros_like(x))
    mean = mask.baseline(x, "mean")
    torch.testing.assert_close(mean[:, :, 3, 5], x.mean(dim=(2, 3)))
    blurred = mask.baseline(x, "blur")
    assert blurred.shape == x.shape and blurred.std() < x.std()
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(mask.baseline(flat, "blur"), flat)
    with pytest.raises(ValueError, match="unknown baseline"):
        mask.baseline(x, "noise")


def test_relative_probability():
    logits = torch.tensor([[1.0, 0.0, 3.0]])
    value = mask.relative_probability(logits, torch.tensor([2]), torch.tensor([0]))
    assert float(value) == pytest.approx(torch.e**3 / (torch.e**3 + torch.e))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.Tanh()
        self.head = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).flatten(1))


def test_masking_process_keeps_only_samples_above_threshold():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        p2 = model(x).softmax(1).topk(2).values[:, 1]
    threshold = float(p2.median())
    methods = {"gradcam": {"layer": "conv"}, "gradient": {}}
    out = mask.masking_process(model, methods, ["zeros", "blur"], ["positive", "negative"], threshold)(
        x, torch.zeros(5, dtype=torch.long), torch.arange(5)
    )
    kept = out["kept"].bool()
    assert torch.equal(kept, p2 > threshold)
    assert out["value"].shape == (2, 2, 2, 2, 2, 5) and out["k"].shape == (2, 2, 2, 5)
    assert out["value"][..., kept].isfinite().all() and out["value"][..., ~kept].isnan().all()
    assert (out["k"][..., kept] >= 0).all() and (out["k"][..., ~kept] == -1).all()
    torch.testing.assert_close(out["before"][0] + out["before"][1], torch.ones(5))
