"""bh.explain_generation: a language model's answer explained in one teacher-forced forward pass.

Oracles: row j of the matrix equals bh.explain_text on the prefix (prompt + answer[:j]) with class answer[j],
for every method and target (float64, GPT-2 and Llama, padded prompts of different lengths); the total equals
the sum of the rows for linear methods (hypothesis) and the same total without rows; a foil answer's contrast
equals the difference of the two answers' totals computed alone; the potentials are the model's own
log-probabilities; a generated answer is the model's own greedy answer."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.generation import GENERATION_METHODS

from _hf import VOCAB, build

TARGETS = ["logit", "softmax", "log_softmax", "weighted", "mean", "max"]
EXACT = dict(rtol=1e-9, atol=1e-12)


pytestmark = pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")


def rows_of(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def right_padded(rows):
    """(ids, mask) right-padded: how a user's tokenizer gives a batch of prompts."""
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def assert_rows_are_prefix_explanations(model, prompts, answers, method, target, **options):
    """Row j of sample b == explain_text(prompt_b + answer_b[:j], class answer_b[j]) on that sequence's columns."""
    ids, mask = right_padded(prompts)
    g = bh.explain_generation(model, ids, torch.tensor(answers), attention_mask=mask, method=method, target=target,
                              **options)  # fmt: skip
    p = g.prompt_length
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        for j in range(len(answer)):
            prefix = torch.tensor([prompt + answer[:j]])
            per_step = isinstance(target, bh.targets.Versus) and isinstance(target.other, torch.Tensor)
            t = bh.targets.Versus(int(target.other[b, j])) if per_step else target
            e = bh.explain_text(model, prefix, method=method, target=t, classes=answer[j], **options)
            row = g.matrix[b, j]
            start = p - len(prompt)
            torch.testing.assert_close(row[start : p + j], e.attributions[0], **EXACT)
            assert row[:start].eq(0).all() and row[p + j :].eq(0).all()  # padding, and from column P + j on
            torch.testing.assert_close(g.probabilities[b, j], e.probabilities[0, answer[j]], **EXACT)
    return g


ROW_CASES = [(name, method) for name in ("gpt2", "llama") for method in GENERATION_METHODS if method != "smoothgrad"]


@pytest.mark.parametrize("name, method", ROW_CASES)
def test_row_j_is_the_prefix_explained_alone(lms, name, method):
    """Every method (SmoothGrad draws its noise for the shape it is given, so its rows cannot equal a prefix's),
    two targets here; every target in the slow test below."""
    options = {"n_steps": 3} if method == "integrated_gradients" else {}
    prompts, answers = rows_of((5, 3), seed=1), rows_of((3, 3), seed=2)
    for target in ("log_softmax", "weighted"):
        assert_rows_are_prefix_explanations(lms[name], prompts, answers, method, target, **options)


@pytest.mark.slow
@pytest.mark.parametrize("name, method", ROW_CASES)
def test_row_j_is_the_prefix_explained_alone_for_every_target(lms, name, method):
    options = {"n_steps": 3} if method == "integrated_gradients" else {}
    prompts, answers = rows_of((5, 3), seed=1), rows_of((4, 4), seed=2)
    for target in TARGETS:
        assert_rows_are_prefix_explanations(lms[name], prompts, answers, method, target, **options)


def test_a_per_step_foil_token_is_versus_at_every_step(lms):
    prompts, answers = rows_of((4, 6), seed=3), rows_of((3, 3), seed=4)
    foils = (torch.tensor(answers) + 1 - 2) % (VOCAB - 2) + 2  # another token at every step
    g = assert_rows_are_prefix_explanations(lms["llama"], prompts, answers, "attnlrp", bh.targets.Versus(foils))
    assert g.target == "versus"


@settings(max_examples=10)
@given(
    prompt_lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    answer_length=st.integers(1, 3),
    name=st.sampled_from(["gpt2", "llama"]),
    method=st.sampled_from(["gradient", "input_x_gradient", "attnlrp", "integrated_gradients"]),
    target=st.sampled_from(TARGETS),
)
def test_property_total_is_the_sum_of_the_rows(lms, prompt_lengths, answer_length, name, method, target):
    model = lms[name]
    ids, mask = right_padded(rows_of(prompt_lengths, seed=len(prompt_lengths)))
    answers = torch.tensor(rows_of([answer_length] * len(prompt_lengths), seed=answer_length))
    options = dict(attention_mask=mask, method=method, target=target, reduce="sum")
    options.update({"n_steps": 3} if method == "integrated_gradients" else {})
    g = bh.explain_generation(model, ids, answers, **options)
    assert g.linear
    close = EXACT if name == "gpt2" else dict(rtol=1e-5, atol=1e-7)  # Llama's RMSNorm computes in float32
    torch.testing.assert_close(g.total, g.matrix.sum(1), **close)
    alone = bh.explain_generation(model, ids, answers, per_step=False, **options)
    assert alone.matrix is None
    torch.testing.assert_close(alone.total, g.total, **close)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_foil_contrast_is_the_difference_of_the_two_answers(lms, name):
    model = lms[name]
    ids, mask = right_padded(rows_of((5, 3), seed=5))
    answer, foil = rows_of((3, 2), seed=6), rows_of((4, 1), seed=7)  # answers and foils of several lengths
    kw = dict(attention_mask=mask, method="attnlrp", target="log_softmax")
    both = bh.explain_generation(model, ids, answer, foil_ids=foil, **kw)
    a = bh.explain_generation(model, ids, answer, **kw)
    f = bh.explain_generation(model, ids, foil, **kw)
    p = both.prompt_length
    torch.testing.assert_close(both.total[:, :p], a.total[:, :p] - f.total[:, :p], **EXACT)
    torch.testing.assert_close(both.total[:, p:], a.total[:, p:], **EXACT)  # the answer's own tokens
    torch.testing.assert_close(both.foil_total, -f.total, **EXACT)
    torch.testing.assert_close(both.potential, a.potential - f.potential, **EXACT)
    torch.testing.assert_close(both.foil_matrix, f.matrix, **EXACT)
    torch.testing.assert_close(both.total[:, :p], both.matrix.sum(1)[:, :p] - both.foil_matrix.sum(1)[:, :p], **EXACT)


def test_the_potential_is_the_answers_log_probability(lms):
    model = lms["gpt2"]
    prompts, answers = rows_of((4, 2), seed=8), rows_of((3, 3), seed=9)
    ids, mask = right_padded(prompts)
    g = bh.explain_generation(model, ids, torch.tensor(answers), attention_mask=mask)
    with torch.no_grad():
        for b, (prompt, answer) in enumerate(zip(prompts, answers)):
            seq = torch.tensor([prompt + answer])
            logp = model(seq).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
            want = logp.gather(1, torch.tensor(answer)[:, None]).squeeze(1)
            torch.testing.assert_close(g.step_potentials[b], want, **EXACT)
            torch.testing.assert_close(g.probabilities[b], want.exp(), **EXACT)
    torch.testing.assert_close(g.potential, g.step_potentials.sum(1), **EXACT)


def test_without_an_answer_the_model_answers_first(lms):
    model = lms["gpt2"]
    prompts = rows_of((5, 3), seed=10)
    ids, mask = right_padded(prompts)
    g = bh.explain_generation(model, ids, attention_mask=mask, max_new_tokens=4)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        answer = want[0, len(prompt) :].tolist()
        eos = answer.index(0) + 1 if 0 in answer else len(answer)  # cut after the first EOS (id 0 here)
        assert g.answer_ids[b][g.answer_mask[b].bool()].tolist() == answer[:eos]
    answers = [r[m.bool()].tolist() for r, m in zip(g.answer_ids, g.answer_mask)]
    given_answer = bh.explain_generation(model, ids, answers, attention_mask=mask)
    torch.testing.assert_close(given_answer.total, g.total, **EXACT)


def test_batched_seeds_equal_one_backward_per_step(lms):
    model = lms["llama"]
    ids, mask = right_padded(rows_of((5, 3), seed=11))
    answers = torch.tensor(rows_of((3, 3), seed=12))
    for method in ("gradient", "input_x_gradient", "attnlrp"):
        loop = bh.explain_generation(model, ids, answers, attention_mask=mask, method=method, target="weighted")
        batched = bh.explain_generation(
            model, ids, answers, attention_mask=mask, method=method, target="weighted", batch_steps=True
        )
        torch.testing.assert_close(batched.matrix, loop.matrix, **EXACT)
        torch.testing.assert_close(batched.total, loop.total, **EXACT)


def test_the_model_is_left_as_it_was(lms):
    model = lms["llama"]
    before = testing.model_state(model)
    bh.explain_generation(model, torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7]]), method="attnlrp")
    testing.assert_same_state(model, before)
    testing.assert_no_hooks_left(model)


def test_bad_requests_get_typed_errors(lms):
    model = lms["gpt2"]
    prompt, answer = torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7]])
    cases = [
        (dict(method="rollout"), bh.errors.OptionError, "explain_generation has no method"),
        (dict(answer_ids=torch.tensor([[6, 99]])), bh.errors.InputError, r"99 at position \(0, 1\) of answer_ids"),
        (dict(foil_ids=[[-1]]), bh.errors.InputError, r"-1 at position \(0, 0\) of foil_ids"),
        (dict(input_ids=[[3, 99, 5]], answer_ids=None), bh.errors.InputError, r"99 at position \(0, 1\) of input_ids"),
        (
            dict(input_ids=torch.randint(2, VOCAB, (1, 40)), answer_ids=None),
            bh.errors.InputError,
            "40 tokens, the model has 32",
        ),
        (dict(input_ids="a prompt"), bh.errors.InputError, "tokenizer="),
        (dict(answer_ids=torch.tensor([[6], [7], [8]])), bh.errors.InputError, "3 rows for 1 prompts"),
        (dict(target=bh.targets.Versus(torch.tensor([[1, 2, 3, 4]]))), bh.errors.OptionError, "per-step Versus"),
        (dict(reduce="max"), bh.errors.OptionError, "reduce"),
        (dict(n_step=3), bh.errors.OptionError, "did you mean"),
        (dict(input_ids=torch.randint(2, VOCAB, (1, 31))), bh.errors.InputError, "33 tokens, the model has 32"),
    ]
    for change, error, message in cases:
        kw = dict(input_ids=prompt, answer_ids=answer)
        kw.update(change)
        with pytest.raises(error, match=message):
            bh.explain_generation(model, **kw)


def test_models_that_continue_no_prompt_are_refused():
    """An encoder (BERT) or an encoder-decoder (T5) cannot continue a prompt: a ModelError that says what they are,
    not the forward pass's own error."""
    import transformers

    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    )
    prompt, answer = torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7]])
    with pytest.raises(bh.errors.ModelError, match="BertForSequenceClassification does not declare causal attention"):
        bh.explain_generation(build("bert"), prompt, answer)
    with pytest.raises(bh.errors.ModelError, match="T5ForConditionalGeneration is an encoder-decoder"):
        bh.explain_generation(t5, prompt, answer)


def test_non_finite_logits_name_the_steps():
    broken = build("gpt2")
    with torch.no_grad():
        broken.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(bh.errors.ModelOutputError, match=r"NaN or Inf at answer steps \[0, 1\] of sequences \[0\]"):
        bh.explain_generation(broken, torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7]]))
