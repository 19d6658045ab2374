"""Gradient checkpointing: every text method gives, on a checkpointed model in training mode with no dropout,
the attributions it gives without checkpointing (float64, tight); reentrant checkpointing is refused with a
typed error that names the fix; rules never act on a recomputation, also when the backward pass (and the
recomputation with it) runs in another thread, as on CUDA."""

import threading
import warnings

import pytest
import torch
import torch.utils.checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

import _lm
import backprop_hooks as bh
from backprop_hooks import testing

TIGHT = dict(rtol=1e-10, atol=1e-13)


def _plain_and_checkpointed(name: str, reentrant: bool = False):
    plain = _lm.build(name)
    return plain, _lm.enable_checkpointing(_lm.build(name), reentrant)


@pytest.mark.parametrize(
    "name, method",
    _lm.cases({("llama", "*"), ("gpt2", "attnlrp"), ("gpt2", "grad_rollout"), ("gpt2", "transformer_attribution")}),
)
def test_checkpointing_gives_the_attributions_without_it(name, method):
    plain, model = _plain_and_checkpointed(name)
    ids, mask = _lm.inputs(name)
    expected = _lm.explain(plain, ids, method, mask)
    with warnings.catch_warnings(), _lm.threads_of(_lm.decoder_layers(model)[-1].mlp) as runs:
        warnings.simplefilter("error", bh.errors.TrainingModeWarning)  # no dropout: training mode is legitimate
        got = _lm.explain(model, ids, method, mask)
    torch.testing.assert_close(got, expected, **TIGHT)
    if method in _lm.GRADIENT_FREE:
        assert len(runs) == 1
    else:  # the explained forward and its recomputation (SmoothGrad and IG: also the seed's forward)
        assert len(runs) >= 2
    assert model.training and plain.training is False
    testing.assert_no_hooks_left(model)


@pytest.mark.parametrize(
    "name, method",
    _lm.cases({("llama", "gradient"), ("llama", "rollout"), ("llama", "grad_rollout"), ("gpt2", "attnlrp")}),
)
def test_reentrant_checkpointing_is_refused_with_the_fix(name, method):
    plain, model = _plain_and_checkpointed(name, reentrant=True)
    ids, mask = _lm.inputs(name)
    if method in _lm.GRADIENT_FREE:  # no backward pass: reentrant checkpointing changes nothing
        torch.testing.assert_close(_lm.explain(model, ids, method, mask), _lm.explain(plain, ids, method, mask))
        return
    with pytest.raises(bh.errors.ModelError, match=r"use_reentrant=True.*'use_reentrant': False"):
        _lm.explain(model, ids, method, mask)
    testing.assert_no_hooks_left(model)
    assert model.training


@pytest.mark.parametrize(
    "name, method",
    _lm.cases(
        {("llama", "grad_rollout"), ("gpt2", "transformer_attribution"), ("gpt2", "attnlrp")},
        methods=["gradient", "attnlrp", "grad_rollout", "transformer_attribution", "vit_gradcam"],
    ),
)
def test_recomputation_in_another_thread(name, method):
    """The backward pass in another thread (CUDA's device threads): the recomputation runs there, the rules
    of the explained forward still hold."""
    plain, model = _plain_and_checkpointed(name)
    ids, mask = _lm.inputs(name)
    expected = _lm.explain(plain, ids, method, mask)
    with _lm.threads_of(_lm.decoder_layers(model)[-1].mlp) as runs, _lm.backward_in_another_thread():
        got = _lm.explain(model, ids, method, mask)
    assert runs[0] == threading.get_ident() and any(t != runs[0] for t in runs[1:])  # recomputed elsewhere
    torch.testing.assert_close(got, expected, **TIGHT)


class _Calls(bh.Rule):
    """Counts the module calls it acts on (when they start: a recomputation may stop inside the module)."""

    needs_backward = False

    def __init__(self):
        self.calls = 0

    def before(self, module, args):
        self.calls += 1


@pytest.mark.parametrize("other_thread", [False, True])
def test_rules_do_not_act_on_a_recomputation(other_thread):
    """A rule sees the explained forward once: the recomputation (same thread or not) runs the model alone."""
    model = _lm.enable_checkpointing(_lm.build("llama"))
    ids, mask = _lm.inputs("llama")
    counted = _Calls()
    x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with bh.attach(model, {"model.layers.0.mlp": counted}), _lm.threads_of(model.model.layers[0].mlp) as runs:
        logits = model(inputs_embeds=x, attention_mask=mask).logits[:, -1]
        if other_thread:
            with _lm.backward_in_another_thread():
                torch.autograd.grad(logits.sum(), x)
        else:
            torch.autograd.grad(logits.sum(), x)
    assert len(runs) == 2 and counted.calls == 1


def test_function_rules_do_not_act_on_a_recomputation():
    """The attention capture replaces SDPA by a deferred node: the recomputation (without it: autograd runs the
    backward pass without the forward's torch-function modes) matches, and each layer is recorded once."""
    from backprop_hooks.rules.attention import AttentionCapture

    model = _lm.enable_checkpointing(_lm.build("llama"))
    ids, mask = _lm.inputs("llama")
    capture = AttentionCapture()
    x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with capture.recording(), _lm.threads_of(model.model.layers[0].self_attn) as runs:
        logits = model(inputs_embeds=x, attention_mask=mask).logits[:, -1]
        torch.autograd.grad(logits.sum(), x)
    assert len(runs) == 2 and len(capture.shapes) == len(model.model.layers)


def test_recomputing_is_false_outside_a_backward_pass_and_in_a_reentrant_one():
    from backprop_hooks import checkpointing

    seen = []
    layer = torch.nn.Linear(3, 3)
    layer.register_forward_pre_hook(lambda m, a: seen.append(checkpointing.recomputing()))
    x = torch.randn(2, 3, requires_grad=True)
    for reentrant in (False, True):
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=reentrant)
        torch.autograd.backward(y.sum())
    assert seen == [False, True, False, False]  # non-reentrant: forward, recomputation; reentrant: both differentiate


def test_dropout_in_training_mode_is_warned_or_refused():
    model = _lm.enable_checkpointing(_lm.build("gpt2"))
    model.transformer.h[1].attn.attn_dropout.p = 0.1
    ids, mask = _lm.inputs("gpt2")
    with pytest.warns(bh.errors.TrainingModeWarning, match=r"transformer\.h\.1\.attn\.attn_dropout \(p=0\.1\)"):
        _lm.explain(model, ids, "input_x_gradient", mask)
    with pytest.raises(bh.errors.RuleError, match="dropout_p=0.1"), warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.TrainingModeWarning)
        _lm.explain(model, ids, "attnlrp", mask)


def test_attention_dropout_attributes_are_training_effects():
    from backprop_hooks.validate import training_effects

    model = _lm.build("llama").train()
    assert training_effects(model) == []
    model.model.layers[0].self_attn.attention_dropout = 0.1
    assert training_effects(model) == ["model.layers.0.self_attn (attention_dropout=0.1)"]


@pytest.mark.slow
@settings(max_examples=testing.examples(8))
@given(
    name=st.sampled_from(_lm.LMS),
    batch=st.integers(1, 3),
    length=st.integers(2, 9),
    target=st.sampled_from(["logit", "weighted", "max", "log_softmax"]),
)
def test_checkpointed_attnlrp_equals_plain_property(name, batch, length, target):
    plain, model = _plain_and_checkpointed(name)
    ids, mask = _lm.inputs(name, batch=batch, length=length)
    expected = _lm.explain(plain, ids, "attnlrp", mask, target=target)
    torch.testing.assert_close(_lm.explain(model, ids, "attnlrp", mask, target=target), expected, **TIGHT)


# ------------------------------------------------------------------------------------------- on CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", ["gradient", "attnlrp", "grad_rollout", "transformer_attribution"])
@pytest.mark.parametrize("name", _lm.LMS)
def test_checkpointing_on_cuda(name, method):
    """On CUDA the backward pass and the recomputation run in the device's autograd thread."""
    ids, mask = _lm.inputs(name)
    on_cpu = _lm.explain(_lm.build(name), ids, method, mask)
    plain, model = (m.cuda() for m in _plain_and_checkpointed(name))
    ids, mask = ids.cuda(), mask.cuda()
    expected = _lm.explain(plain, ids, method, mask)
    with _lm.threads_of(_lm.decoder_layers(model)[-1].mlp) as runs:
        got = _lm.explain(model, ids, method, mask)
    assert len(runs) >= 2
    torch.testing.assert_close(got, expected, **TIGHT)
    torch.testing.assert_close(got.cpu(), on_cpu, rtol=1e-7, atol=1e-10)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", ["attnlrp", "grad_rollout"])
@pytest.mark.parametrize("name", _lm.LMS)
def test_checkpointing_on_cuda_in_bfloat16(name, method):
    plain, model = (m.cuda().to(torch.bfloat16) for m in _plain_and_checkpointed(name))
    ids, mask = (t.cuda() for t in _lm.inputs(name))
    expected = _lm.explain(plain, ids, method, mask)
    torch.testing.assert_close(_lm.explain(model, ids, method, mask), expected, rtol=1e-2, atol=1e-4)
