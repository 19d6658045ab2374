"""bh.explain_generation at LLM scale: under gradient checkpointing (train mode, no dropout; the backward also run
in another thread, as on CUDA) the rows and the total are those of the plain model, batched seeds included;
reentrant checkpointing is refused naming the fix; offloaded weights give the plain model's answer; quantised
weights (optimum-quanto) the answer of the dequantised model; bf16 and fp16 models float32 attributions close
to float64."""

import copy
import warnings

import pytest
import torch

import _lm
import backprop_hooks as bh
from test_lm_weights import _dequantized_copy, _offload, _quanto

EXACT = dict(rtol=1e-10, atol=1e-13)
FAST = {("gpt2", "attnlrp"), ("llama", "input_x_gradient"), ("llama", "attnlrp")}
CASES = [
    pytest.param(name, method, marks=() if (name, method) in FAST else pytest.mark.slow)
    for name in _lm.LMS
    for method in ("gradient", "input_x_gradient", "integrated_gradients", "attnlrp")
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames gradient_checkpointing_enable
        yield


def question(name: str):
    """Two prompts of different lengths (right-padded), answers of 3 tokens, foils of 2."""
    ids, mask = _lm.inputs(name, batch=2, length=6)
    g = torch.Generator().manual_seed(4)
    return ids, mask, torch.randint(2, 40, (2, 3), generator=g), torch.randint(2, 40, (2, 2), generator=g)


def explain(model, name, method, **kw):
    ids, mask, answer, foil = question(name)
    options = _lm.OPTIONS.get(method, {})
    return bh.explain_generation(model, ids, answer, foil_ids=foil, attention_mask=mask, method=method,
                                 target="weighted", **options, **kw)  # fmt: skip


def assert_same(got, want, **close):
    close = close or EXACT
    torch.testing.assert_close(got.total, want.total, **close)
    torch.testing.assert_close(got.matrix, want.matrix, **close)
    torch.testing.assert_close(got.foil_matrix, want.foil_matrix, **close)


@pytest.mark.parametrize("name, method", CASES)
def test_checkpointing_gives_the_plain_answer(name, method):
    plain = _lm.build(name)
    want = explain(plain, name, method)
    model = copy.deepcopy(plain)
    _lm.enable_checkpointing(model)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", bh.errors.TrainingModeWarning)  # no dropout: training mode is legitimate
        assert_same(explain(model, name, method), want)
        if method != "integrated_gradients":
            assert_same(explain(model, name, method, batch_steps=True), want)
        with _lm.backward_in_another_thread():
            assert_same(explain(model, name, method), want)
    assert model.training  # left as it was


def test_reentrant_checkpointing_is_refused_naming_the_fix():
    model = _lm.build("llama")
    _lm.enable_checkpointing(model, reentrant=True)
    model.train()
    with pytest.raises(bh.errors.ModelError, match="use_reentrant"):
        explain(model, "llama", "attnlrp")


@pytest.mark.parametrize("how", ["one_layer_on_disk", "disk"])
def test_offloaded_weights_give_the_plain_answer(tmp_path, how):
    """One layer on disk, or every weight (the input embedding's too: the batch goes to the hook's device)."""
    plain = _lm.build("llama")
    model = _offload(copy.deepcopy(plain), "llama", how, tmp_path)
    assert any(p.is_meta for p in model.parameters())
    assert_same(explain(model, "llama", "attnlrp"), explain(plain, "llama", "attnlrp"))
    ids, mask, _, _ = question("llama")
    generated = bh.explain_generation(model, ids, attention_mask=mask, max_new_tokens=2)
    alone = bh.explain_generation(plain, ids, attention_mask=mask, max_new_tokens=2)
    assert torch.equal(generated.answer_ids, alone.answer_ids)


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 0.035), (torch.float16, 0.005)])  # 3x the largest measured
@pytest.mark.parametrize("name", _lm.LMS)
def test_half_precision_stays_close_to_float64(name, dtype, bound):
    """Attributions in float32; relative error (Frobenius, over the matrix) against the same weights in float64
    (measured: bf16 1.1-1.2 % input_x_gradient, 0.3-0.5 % attnlrp; fp16 0.14 % and 0.06-0.09 %)."""
    half = _lm.build(name).to(dtype)
    exact = copy.deepcopy(half).double()
    for method in ("input_x_gradient", "attnlrp"):
        got, want = explain(half, name, method), explain(exact, name, method)
        assert got.total.dtype == torch.float32 and got.probabilities.dtype == torch.float32
        error = (got.matrix.double() - want.matrix).norm() / want.matrix.norm()
        assert error < bound, (method, float(error))
        torch.testing.assert_close(got.potential.double(), want.potential, rtol=bound, atol=bound)


def test_quanto_weights_give_the_answer_of_the_dequantized_model():
    """A quantised language-model head is read at every position (its backward takes no sliced input)."""
    float_model = _lm.build("llama").float()
    model = _quanto(copy.deepcopy(float_model), "qint8")
    reference = _dequantized_copy(float_model, model)
    for method in ("input_x_gradient", "attnlrp"):
        assert_same(explain(model, "llama", method), explain(reference, "llama", method), rtol=1e-5, atol=1e-6)
