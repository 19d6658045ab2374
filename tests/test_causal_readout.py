"""A causal language model's read-out in bh.explain_text: by default each row's next token after its last real
token, with the positions a left-padded row has alone, so a padded batch (left or right) gives every row what
it gets alone (GPT-2: absolute positions; Llama: rotary, grouped-query); a logits= function that reads a
padding position is refused; per-position (B, L, V) logits say how to pick one; a left-padded encoder warns."""

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import backprop_hooks as bh
from backprop_hooks import causal

from _hf import VOCAB, build

LENGTHS = (7, 5, 3)


pytestmark = pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")


def padded(rows, side: str, pad: int = 0):
    """(ids, mask) of token rows padded on ``side`` to the longest."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    return ids, mask


def token_rows(lengths, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def assert_rows_alone(model, rows, side, method, target, **options):
    ids, mask = padded(rows, side)
    e = bh.explain_text(model, ids, mask, method=method, target=target, **options)
    for i, r in enumerate(rows):
        alone = bh.explain_text(model, torch.tensor([r]), method=method, target=target, **options)
        cols = mask[i].bool()
        torch.testing.assert_close(e.attributions[i, cols], alone.attributions[0], rtol=1e-9, atol=1e-12)
        assert e.attributions[i, ~cols].eq(0).all()
        torch.testing.assert_close(e.logits[i], alone.logits[0], rtol=1e-10, atol=1e-12)
        assert int(e.classes[i]) == int(alone.classes[0])
    return e


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["input_x_gradient", "attnlrp", "integrated_gradients"])
def test_a_padded_batch_gives_every_row_what_it_gets_alone(lms, name, side, method):
    options = {"n_steps": 4} if method == "integrated_gradients" else {}
    for target in ("logit", "weighted"):
        e = assert_rows_alone(lms[name], token_rows(LENGTHS), side, method, target, **options)
    ids, mask = padded(token_rows(LENGTHS), side)
    assert torch.equal(e.extras["positions"], causal.last_real(mask))


@settings(max_examples=10)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    side=st.sampled_from(["left", "right"]),
    name=st.sampled_from(["gpt2", "llama"]),
    target=st.sampled_from(["logit", "log_softmax", "weighted", "max"]),
)
def test_property_padded_rows_equal_each_row_alone(lms, lengths, side, name, target):
    assert_rows_alone(lms[name], token_rows(lengths, seed=len(lengths)), side, "input_x_gradient", target)


def test_a_causal_lm_whose_attention_declares_nothing_is_read_as_one():
    """Bloom declares no ``is_causal``: it is known as a causal LM by its class (Hugging Face's causal-LM registry),
    so a right-padded batch reads each row's next token, as alone."""
    bloom = build("bloom")
    assert causal.is_causal(bloom) and not causal.is_causal(build("bert"))
    for method in ("input_x_gradient", "attnlrp"):
        assert_rows_alone(bloom, token_rows(LENGTHS), "right", method, "weighted")


def test_nan_logits_of_a_padded_batch_name_the_padding():
    """Bloom's own forward gives NaN for left-padded rows (transformers 5.25): refused, and the message says the
    batch is padded and what to try, for explain_text and explain_generation (whose prompts are left-padded)."""
    bloom, rows = build("bloom"), token_rows(LENGTHS)
    ids, mask = padded(rows, "left")
    with pytest.raises(bh.errors.ModelOutputError, match="padded on the left.*the other padding side"):
        bh.explain_text(bloom, ids, mask)
    with pytest.raises(bh.errors.ModelOutputError, match="padded on the left.*one at a time"):
        bh.explain_generation(bloom, [r[:-1] for r in rows], [r[-1:] for r in rows])
    bh.explain_generation(bloom, [rows[0][:-1]], [rows[0][-1:]])  # alone: no padding, no NaN


def test_the_next_token_is_each_rows_own(lms):
    """The default read-out is the logits at each row's last real token: the model's own next-token distribution."""
    gpt2 = lms["gpt2"]
    rows = token_rows(LENGTHS)
    ids, mask = padded(rows, "right")
    e = bh.explain_text(gpt2, ids, mask)
    with torch.no_grad():
        want = torch.stack([gpt2(torch.tensor([r])).logits[0, -1] for r in rows])
    torch.testing.assert_close(e.logits, want, rtol=1e-10, atol=1e-12)
    assert e.classes.tolist() == want.argmax(1).tolist()


def test_a_readout_on_padding_is_refused(lms):
    """The old README read-out, out.logits[:, -1], on a right-padded batch reads rows 1 and 2 at padding."""
    ids, mask = padded(token_rows(LENGTHS), "right")
    with pytest.raises(bh.errors.OptionError, match=r"row 1 at position 6, which is padding \(its last real token is"):
        bh.explain_text(lms["gpt2"], ids, mask, logits=lambda out: out.logits[:, -1])
    with pytest.raises(bh.errors.BackpropHooksError, match="padding"):
        bh.explain_text(lms["llama"], ids, mask, method="attnlrp", logits=lambda out: out.logits[:, -1])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_last_column_of_a_left_padded_batch_is_each_rows_next_token(lms, name):
    """With left padding column -1 is real for every row, and the positions are each row's own (GPT-2 needs them)."""
    model, rows = lms[name], token_rows(LENGTHS)
    ids, mask = padded(rows, "left")
    e = bh.explain_text(model, ids, mask, logits=lambda out: out.logits[:, -1])
    for i, r in enumerate(rows):
        alone = bh.explain_text(model, torch.tensor([r]))
        torch.testing.assert_close(e.attributions[i, mask[i].bool()], alone.attributions[0], rtol=1e-9, atol=1e-12)


def test_user_position_ids_are_kept(lms):
    """A user's own position_ids win over the ones computed from the mask."""
    gpt2, rows = lms["gpt2"], token_rows(LENGTHS)
    ids, mask = padded(rows, "left")
    shifted = torch.arange(ids.shape[1]).expand_as(ids)  # column positions: the batch as the user wants it
    e = bh.explain_text(gpt2, ids, mask, model_kwargs={"position_ids": shifted})
    with torch.no_grad():
        want = gpt2(ids, attention_mask=mask, position_ids=shifted).logits[:, -1]
    torch.testing.assert_close(e.logits, want, rtol=1e-10, atol=1e-12)


def test_per_position_logits_say_how_to_pick_a_position(lms):
    ids, mask = padded(token_rows(LENGTHS), "right")
    with pytest.raises(bh.errors.ModelOutputError, match=r"\(B, L, V\).*logits=lambda out: out.logits\[:, i\]"):
        bh.explain_text(lms["gpt2"], ids, mask, logits=lambda out: out.logits)


def test_a_left_padded_encoder_warns():
    bert = build("bert")
    ids, mask = padded(token_rows(LENGTHS), "left")
    with pytest.warns(bh.errors.PaddingWarning, match="pads on the left"):
        bh.explain_text(bert, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bh.errors.PaddingWarning)
        bh.explain_text(bert, *padded(token_rows(LENGTHS), "right"))


def test_the_read_out_helpers():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert causal.last_real(mask).tolist() == [3, 2, 3]
    assert causal.position_ids(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2], [0, 1, 2, 3]]
    assert causal.left_padded(mask) and not causal.left_padded(mask[1:])
