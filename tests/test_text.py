"""bh.explain_text: gradient-family token scores against hand autograd on inputs_embeds; contrast identities
on a text classifier; Integrated Gradients' completeness; a padded batch equals each sequence alone, padded
positions exactly zero; Versus(foil) on a language model's next token (Yin & Neubig 2022); attention
methods over tokens; the model left exactly as it was; typed errors."""

import warnings

import pytest
import torch

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.text import ATTENTION_METHODS, TEXT_METHODS

from _hf import build, text_inputs


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)
        yield


@pytest.fixture(scope="module")
def bert():
    return build("bert")


@pytest.fixture(scope="module")
def gpt2():
    return build("gpt2")


def hand_autograd(model, ids, mask, seed_fn, select=lambda out: out.logits):
    """(E, ∂(seed·logits)/∂E, logits) by plain autograd on inputs_embeds."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    y = select(model(inputs_embeds=embeds, attention_mask=mask))
    (g,) = torch.autograd.grad(y, embeds, seed_fn(y.detach()))
    return embeds.detach(), g, y.detach()


def test_gradient_family_equals_hand_autograd(bert):
    ids, mask = text_inputs("bert")
    target = bh.targets.get("weighted")
    cls = torch.tensor([0, 2, 1])
    embeds, g, y = hand_autograd(bert, ids, mask, lambda y: target.seed(y, cls))
    m = mask.double()
    want = {
        ("input_x_gradient", "sum"): (embeds * g).sum(-1) * m,
        ("input_x_gradient", "l1"): (embeds * g).abs().sum(-1) * m,
        ("gradient", "l2"): g.norm(dim=-1) * m,
        ("gradient", "l1"): g.abs().sum(-1) * m,
        ("gradient", "sum"): g.sum(-1) * m,
    }
    for (method, reduce), w in want.items():
        e = bh.explain_text(bert, ids, mask, method=method, target="weighted", classes=cls, reduce=reduce)
        assert e.attributions.shape == (3, 7)
        torch.testing.assert_close(e.attributions, w, rtol=1e-10, atol=1e-14)
        assert torch.equal(e.logits, y) and torch.equal(e.classes, cls)
        assert e.linear == (reduce == "sum")
    assert bh.explain_text(bert, ids, mask, method="gradient").attributions.ge(0).all()  # default: the L2 norm


def test_contrast_identities_on_a_text_classifier(bert):
    ids, mask = text_inputs("bert")

    def method(x, classes=None, target="logit"):
        return bh.explain_text(bert, ids, mask, method="input_x_gradient", target=target, classes=classes)

    testing.assert_contrast_identities(method, ids, rtol=1e-9, atol=1e-13)


def test_integrated_gradients_is_complete_against_the_pad_baseline(bert):
    ids, mask = text_inputs("bert")
    e = bh.explain_text(bert, ids, mask, method="integrated_gradients", n_steps=32)
    with torch.no_grad():
        emb = bert.get_input_embeddings()
        base = emb(torch.zeros_like(ids)).expand_as(emb(ids))  # pad_token_id = 0 at every position
        y0 = bert(inputs_embeds=base, attention_mask=mask).logits
    rows = torch.arange(3)
    delta = e.logits[rows, e.classes] - y0[rows, e.classes]
    # padded positions contribute exactly nothing to the logits (masked keys), so dropping them is exact
    torch.testing.assert_close(e.attributions.sum(1), delta, rtol=1e-6, atol=1e-9)
    with pytest.raises(bh.errors.OptionError, match="pad_token_id"):  # GPT-2 has no padding token
        bh.explain_text(build("gpt2"), ids, mask, method="integrated_gradients", baseline="pad")


PADDED_FAST = ("input_x_gradient", "integrated_gradients", "grad_rollout", "attnlrp")


@pytest.mark.parametrize(
    "method",
    [m if m in PADDED_FAST else pytest.param(m, marks=pytest.mark.slow) for m in TEXT_METHODS if m != "smoothgrad"],
)
def test_padded_batch_equals_each_sequence_alone(bert, method):
    ids, mask = text_inputs("bert")
    opts = {"n_steps": 4} if method == "integrated_gradients" else {}
    e = bh.explain_text(bert, ids, mask, method=method, target="weighted", **opts)
    assert torch.all(e.attributions[mask == 0] == 0)  # exactly zero
    for i in range(3):
        n = int(mask[i].sum())
        alone = bh.explain_text(bert, ids[i : i + 1, :n], None, method=method, target="weighted", **opts)
        torch.testing.assert_close(e.attributions[i : i + 1, :n], alone.attributions, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(e.logits[i : i + 1], alone.logits, rtol=1e-10, atol=1e-12)


def test_versus_foil_on_next_token_is_yin_and_neubig(gpt2):
    """Why the correct next token and not the foil: the gradient × input of y_correct − y_foil, and it is the
    difference of the two logit explanations; weighted contrasts against the whole vocabulary at once."""
    ids, mask = text_inputs("gpt2", batch=2, length=6)
    mask[:] = 1
    correct, foil = torch.tensor([5, 9]), torch.tensor([7, 3])

    def last(out):
        return out.logits[:, -1]

    def versus_seed(y):
        s = torch.zeros_like(y)
        s[torch.arange(2), correct] = 1.0
        s[torch.arange(2), foil] = -1.0
        return s

    embeds, g, _ = hand_autograd(gpt2, ids, mask, versus_seed, last)
    e = bh.explain_text(gpt2, ids, mask, "input_x_gradient", bh.targets.Versus(foil), correct, logits=last)
    torch.testing.assert_close(e.attributions, (embeds * g).sum(-1), rtol=1e-10, atol=1e-14)
    a = bh.explain_text(gpt2, ids, mask, "input_x_gradient", "logit", correct, logits=last).attributions
    b = bh.explain_text(gpt2, ids, mask, "input_x_gradient", "logit", foil, logits=last).attributions
    torch.testing.assert_close(e.attributions, a - b, rtol=1e-9, atol=1e-13)
    w = bh.explain_text(gpt2, ids, mask, "input_x_gradient", "weighted", correct, logits=last)
    assert w.attributions.shape == (2, 6) and w.logits.shape == (2, 40)


@pytest.mark.parametrize("method", ATTENTION_METHODS)
def test_attention_methods_over_tokens(bert, gpt2, method):
    ids, mask = text_inputs("bert")
    e = bh.explain_text(bert, ids, mask, method=method, target="weighted")
    assert e.attributions.shape == (3, 7) and torch.isfinite(e.attributions).all()
    assert torch.all(e.attributions[mask == 0] == 0)
    gids, gmask = text_inputs("gpt2", batch=2, length=6)
    e = bh.explain_text(gpt2, gids, gmask, method=method, target="max")  # each row's next token (row 1 is padded)
    assert e.attributions.shape == (2, 6) and torch.isfinite(e.attributions).all()
    assert torch.all(e.attributions[gmask == 0] == 0)


def test_rollout_on_text_reads_out_the_class_token_row(bert):
    """rollout over tokens equals the rollout written out from HF's own eager attentions, read at token 0."""
    import copy

    ids, mask = text_inputs("bert")
    e = bh.explain_text(bert, ids, mask, method="rollout")
    ref = copy.deepcopy(bert)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        att = ref(ids, attention_mask=mask, output_attentions=True).attentions
    joint = None
    for a in att:
        a = (a.mean(1) + torch.eye(7, dtype=a.dtype)) / 2
        a = a / a.sum(-1, keepdim=True)
        joint = a if joint is None else a @ joint
    torch.testing.assert_close(e.attributions, joint[:, 0] * mask, rtol=1e-9, atol=1e-12)


def test_the_model_is_left_as_it_was(bert, gpt2):
    for model, name in ((bert, "bert"), (gpt2, "gpt2")):
        ids, mask = text_inputs(name)
        before = testing.model_state(model)
        for method in ("input_x_gradient", "grad_rollout", "transformer_attribution"):
            bh.explain_text(model, ids, mask, method, "weighted", logits=lambda out: out.logits.reshape(3, -1)[:, :5])
        testing.assert_same_state(model, before)
        assert model.config._attn_implementation == "sdpa"


def test_typed_errors(bert):
    ids, mask = text_inputs("bert")
    with pytest.raises(bh.errors.InputError, match="integer"):
        bh.explain_text(bert, ids.double(), mask)
    with pytest.raises(bh.errors.InputError, match="shape of input_ids"):
        bh.explain_text(bert, ids, mask[:, :3])
    with pytest.raises(bh.errors.OptionError, match="accepted"):
        bh.explain_text(bert, ids, mask, method="gradcam")
    with pytest.raises(bh.errors.OptionError, match="reduce"):
        bh.explain_text(bert, ids, mask, reduce="max")
    with pytest.raises(bh.errors.ModelError, match="get_input_embeddings"):
        bh.explain_text(torch.nn.Linear(3, 3), ids, mask)
    with pytest.raises(bh.errors.ClassIndexError):
        bh.explain_text(bert, ids, mask, classes=7)


def test_under_no_grad_and_inference_mode(bert):
    ids, mask = text_inputs("bert")
    for method in ("input_x_gradient", "grad_rollout"):
        want = bh.explain_text(bert, ids, mask, method, "weighted").attributions
        with torch.no_grad():
            assert torch.equal(bh.explain_text(bert, ids, mask, method, "weighted").attributions, want)
        with torch.inference_mode():
            ids_i, mask_i = ids.clone(), mask.clone()  # inference tensors
            assert torch.equal(bh.explain_text(bert, ids_i, mask_i, method, "weighted").attributions, want)
