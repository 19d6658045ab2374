"""Model outputs: a (B, C) tensor, a Hugging Face ModelOutput's ``.logits``, a dict's ``"logits"``, or
``logits=fn`` for anything else (a tuple, a detection head, a causal LM's last position) — for every method."""

import pytest
import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks import errors, testing

pytestmark = pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")

CNN_METHODS = [m for m in bh.methods.available() if bh.methods.get(m).space != "tokens"]
# one of each call path (the base template, many points, a layer, two backwards, rules with state)
FEW = ["gradient", "smoothgrad", "gradcam", "guided_gradcam", "lrp", "fullgrad"]
SLOW_REST = [pytest.param(m, marks=pytest.mark.slow) for m in CNN_METHODS if m not in FEW]
OPTIONS = {"smoothgrad": {"n_samples": 2, "seed": 0}, "integrated_gradients": {"n_steps": 3}}


class Wrap(nn.Module):
    """The random CNN with its logits packed into another output structure."""

    def __init__(self, net, pack):
        super().__init__()
        self.net, self.pack = net, pack

    def forward(self, x):
        return self.pack(self.net(x))


def hf_output(y):
    from transformers.modeling_outputs import ImageClassifierOutput

    return ImageClassifierOutput(logits=y, hidden_states=(y,))


PACKS = {
    "hf": (hf_output, None),
    "dict": (lambda y: {"logits": y, "features": y * 2}, None),
    "tuple": (lambda y: (y * 3, y), lambda out: out[1]),
    "detection": (lambda y: [{"boxes": torch.zeros(4), "scores": y}], lambda out: out[0]["scores"]),
}


@pytest.fixture(scope="module")
def net():
    return testing.randomize(testing.CNN(3, 8, 5, 2, 4), seed=1)


@pytest.mark.parametrize("name", FEW + SLOW_REST)
def test_every_method_reads_logits_from_any_output(net, name):
    pytest.importorskip("transformers")
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    want = bh.explain(net, x, name, "weighted", **OPTIONS.get(name, {}))
    for pack, (fn, select) in PACKS.items():
        got = bh.explain(Wrap(net, fn), x, name, "weighted", logits=select, **OPTIONS.get(name, {}))
        torch.testing.assert_close(got.logits, want.logits, msg=pack)
        torch.testing.assert_close(got.attributions, want.attributions, rtol=1e-9, atol=1e-12, msg=pack)
    # the same per-call option on a method object
    method = bh.methods.get(name)(Wrap(net, PACKS["tuple"][0]), **OPTIONS.get(name, {}))
    got = method(x, target="weighted", logits=PACKS["tuple"][1])
    torch.testing.assert_close(got.attributions, want.attributions, rtol=1e-9, atol=1e-12)


def test_causal_lm_last_position():
    """A causal LM's next-token scores: (B, L, V) output, ``logits=lambda out: out[:, -1]``."""
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Linear(4, 6)).double().eval()  # (B, L, 4) -> (B, L, V=6)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    e = bh.explain(lm, x, "gradient", "weighted", logits=lambda out: out[:, -1])
    assert e.logits.shape == (2, 6) and e.attributions.shape == x.shape
    assert e.attributions[:, :-1].abs().max() == 0  # only the last position feeds the next token
    with pytest.raises(errors.ModelOutputError, match="pass logits=fn"):
        bh.explain(lm, x)


def test_output_errors_are_typed(net):
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(errors.ModelOutputError, match="got tuple.*logits=lambda out: out\\[0\\]"):
        bh.explain(Wrap(net, lambda y: (y, y)), x)
    with pytest.raises(errors.ModelOutputError, match="got dict"):
        bh.explain(Wrap(net, lambda y: {"scores": y}), x)
    with pytest.raises(errors.ModelOutputError, match="logits= function failed.*KeyError"):
        bh.explain(Wrap(net, lambda y: {"scores": y}), x, logits=lambda out: out["logit"])
    with pytest.raises(errors.ModelOutputError, match="logits= function must return logits of shape"):
        bh.explain(net, x, logits=lambda out: out[0])
    with pytest.raises(errors.OptionError, match="logits= must be a function"):
        bh.explain(net, x, logits="logits")
    testing.assert_same_state(net, testing.model_state(net))
