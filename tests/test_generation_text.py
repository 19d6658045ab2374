"""bh.explain_generation with strings and a Hugging Face fast tokenizer (byte-level BPE trained here, BOS added by
its post-processor, a chat template): prompt and answer tokenised together, a foil's leading space kept, a
batch of prompts of different lengths giving each prompt what it gets alone, the chat template when asked
for, generation when no answer is given, and a word split across the prompt/answer boundary refused."""

import copy

import pytest
import torch

import backprop_hooks as bh

from _tokenizer import gpt2, tokenizer

EXACT = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def lm():
    return gpt2()


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def test_prompt_and_answer_are_tokenised_together(lm, tok):
    g = bh.explain_generation(lm, "The capital of France is", " Paris", tokenizer=tok)
    joint = tok("The capital of France is Paris")["input_ids"]
    prompt = tok("The capital of France is")["input_ids"]
    assert joint[0] == tok.bos_token_id and joint.count(tok.bos_token_id) == 1  # BOS once, as the tokenizer adds it
    assert g.input_ids[0].tolist() == joint
    assert g.answer_ids[0].tolist() == joint[len(prompt) :] and g.prompt_length == len(prompt)
    assert "".join(g.tokens()[0]) == tok.decode(joint)
    ids = bh.explain_generation(lm, torch.tensor([prompt]), torch.tensor([joint[len(prompt) :]]))
    torch.testing.assert_close(g.total, ids.total, **EXACT)  # the same as given token ids


def test_a_leading_space_is_kept(lm, tok):
    spaced = bh.explain_generation(lm, "The capital of France is", " Paris", foil_ids=" Lyon", tokenizer=tok)
    bare = bh.explain_generation(lm, "The capital of France is", "Paris", foil_ids="Lyon", tokenizer=tok)
    assert spaced.answer_ids[0].tolist() == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert bare.answer_ids[0].tolist() == tok("Paris", add_special_tokens=False)["input_ids"]
    assert spaced.foil_ids[0].tolist() == tok(" Lyon", add_special_tokens=False)["input_ids"]
    assert spaced.answer_ids[0].tolist() != bare.answer_ids[0].tolist()


def test_a_batch_of_prompts_gives_each_what_it_gets_alone(lm, tok):
    prompts = ["A break statement terminates the", "The with statement is used to wrap the execution of a"]
    answers = [" loop", " block"]
    batch = bh.explain_generation(lm, prompts, answers, foil_ids=" function", tokenizer=tok, method="attnlrp")
    p = batch.prompt_length
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        alone = bh.explain_generation(lm, prompt, answer, foil_ids=" function", tokenizer=tok, method="attnlrp")
        q, n = alone.prompt_length, alone.answer_ids.shape[1]
        torch.testing.assert_close(batch.total[i, p - q : p + n], alone.total[0], **EXACT)
        assert batch.total[i, : p - q].eq(0).all()  # left padding
        torch.testing.assert_close(batch.potential[i], alone.potential[0], **EXACT)


def test_the_chat_template_when_asked_for(lm, tok):
    g = bh.explain_generation(lm, "What ends a loop?", " break", tokenizer=tok, chat=True)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "What ends a loop?"}], tokenize=False, add_generation_prompt=True
    )
    assert g.input_ids[0, : g.prompt_length].tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    assert g.input_ids[0].tolist().count(tok.bos_token_id) == 1  # the template's BOS, not one more


def test_without_an_answer_the_model_answers(lm, tok):
    g = bh.explain_generation(lm, ["x = ", "The value of"], tokenizer=tok, max_new_tokens=3)
    assert g.answer_ids.shape[1] <= 3 and g.total.shape == g.input_ids.shape
    text = tok("x = ", return_tensors="pt")
    with torch.no_grad():
        want = lm.generate(**text, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert g.answer_ids[0][g.answer_mask[0].bool()].tolist() == want[0, text["input_ids"].shape[1] :].tolist()[:3]


def test_a_token_across_the_boundary_is_refused(lm, tok):
    with pytest.raises(bh.errors.InputError, match="share a token across their boundary"):
        bh.explain_generation(lm, "x = t", "he", tokenizer=tok)
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(bh.errors.OptionError, match="chat template"):
        bh.explain_generation(lm, "x", " y", tokenizer=plain, chat=True)


def test_the_heat_map_draws_the_answer_and_its_steps(lm, tok):
    """Rendered pixels: red and blue cells, grey where a step cannot see; the title names answer and foil; the
    notebook's HTML has the answer row and one row per step."""
    import io

    import numpy as np
    from PIL import Image

    from backprop_hooks.plotting.maps import png

    g = bh.explain_generation(lm, "A break statement terminates the", " loop", foil_ids=" function", tokenizer=tok)
    fig = g.plot()
    pixels = np.asarray(Image.open(io.BytesIO(png(fig))).convert("RGB"), dtype=int)
    r, gr, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((r > 200) & (gr < 120) & (b < 120)).sum() > 50  # red cells
    assert ((b > 200) & (r < 120) & (gr < 120)).sum() > 50  # blue cells
    assert ((r == 0xDD) & (gr == 0xDD) & (b == 0xDD)).sum() > 50  # grey: after each step's own column
    title = fig.axes[0].get_title()
    assert "' loop'" in title and "not ' function'" in title
    page = g._repr_html_()
    assert page.count("<tr>") == 2 + g.answer_ids.shape[1]  # header, the whole answer, the steps
