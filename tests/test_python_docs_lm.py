"""The bundled language model is a Hugging Face pair: it loads offline with the Auto classes, its tokenizer adds
BOS as Llama's does, keeps case and the leading space, pads and templates chats, and ``generate`` is greedy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from backprop_hooks.eval import tokens  # noqa: E402
from backprop_hooks.models import python_docs_lm  # noqa: E402

PROMPT = 'A "break" statement executed in the first suite terminates the loop without executing the "else"'


@pytest.fixture(scope="module")
def pair():
    return python_docs_lm.load()


def test_a_fresh_process_loads_the_directory_offline_with_the_auto_classes():
    code = (
        "import json, sys, transformers\n"
        "d = sys.argv[1]\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(d)\n"
        "t = transformers.AutoTokenizer.from_pretrained(d)\n"
        "ids = t('Paris', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=3)\n"
        "print(json.dumps([type(m).__name__, str(m.dtype), t.is_fast, ids[0].tolist()[0] == t.bos_token_id,"
        " ids.shape[1], out.shape[1] - ids.shape[1]]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(python_docs_lm.DIRECTORY)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == ["GPT2LMHeadModel", "torch.float32", True, True, 3, 3]


def test_the_shipped_directory_is_small_and_complete():
    names = {p.name for p in python_docs_lm.DIRECTORY.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= names
    assert sum(p.stat().st_size for p in python_docs_lm.DIRECTORY.iterdir()) < 2_000_000


def test_the_tokenizer_adds_bos_keeps_case_and_the_leading_space(pair):
    _, tok = pair
    bos = tok.bos_token_id
    assert len(tok) == python_docs_lm.VOCAB_SIZE and tok.eos_token_id == bos and tok.pad_token_id not in (None, bos)
    assert tok("Paris").input_ids[0] == bos and tok(["a", "b c"]).input_ids[1][0] == bos
    assert tok(" Paris", add_special_tokens=False).input_ids != tok("Paris", add_special_tokens=False).input_ids
    assert tok.decode(tok(PROMPT).input_ids, skip_special_tokens=True) == PROMPT  # original case, lossless
    assert tok.padding_side == "right"
    padded = tok(["a", "a longer one"], padding=True).input_ids
    assert padded[0][-1] == tok.pad_token_id


def test_the_chat_template_opens_with_bos_and_prompts_the_assistant(pair):
    _, tok = pair
    chat = [{"role": "user", "content": "What does break do?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<|endoftext|>user: What does break do?\nassistant:"
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # BOS once, from the template


def test_generate_is_greedy_and_deterministic_and_left_padding_changes_nothing(pair):
    model, tok = pair
    assert not model.training and model.config._attn_implementation == "sdpa"
    enc = tok(PROMPT, return_tensors="pt")
    first = model.generate(**enc, max_new_tokens=8)
    assert (first == model.generate(**enc, max_new_tokens=8)).all()
    assert tok.decode(first[0, enc.input_ids.shape[1] :]).startswith(" clause")
    tok.padding_side = "left"
    try:
        batch = tok([PROMPT, "The"], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    both = model.generate(**batch, max_new_tokens=8)
    alone = first[0, enc.input_ids.shape[1] :]  # it stops at EOS; in the batch, padding follows
    assert (both[0, batch.input_ids.shape[1] :][: len(alone)] == alone).all()


def test_readable_tokens_are_words_without_byte_marks(pair):
    _, tok = pair
    shown = tokens.readable(tok)(tok("The break statement").input_ids)
    assert shown == ["<|endoftext|>", "The", "break", "statement"]
    assert tokens.readable(tok, strip=False)(tok(" break", add_special_tokens=False).input_ids) == [" break"]


def test_captum_llm_attribution_runs_on_the_pair(pair):
    """Captum's LLM attribution (input × gradient at the embeddings) takes the pair as it is."""
    attr = pytest.importorskip("captum.attr")
    model, tok = pair
    explainer = attr.LLMGradientAttribution(attr.LayerGradientXActivation(model, model.get_input_embeddings()), tok)
    result = explainer.attribute(attr.TextTokenInput(PROMPT, tok), target=" clause is executed.")
    assert result.input_tokens[0] == tok.bos_token and len(result.input_tokens) == len(tok(PROMPT).input_ids)
    assert tuple(result.token_attr.shape) == (4, len(result.input_tokens))  # " clause", " is", " executed", "."


@pytest.mark.slow
def test_inseq_runs_on_the_pair(pair):
    """Inseq 0.7.1's saliency on a prompt and its continuation (``pip install --no-deps inseq==0.7.1``)."""
    inseq = pytest.importorskip("inseq")
    model, tok = pair
    result = inseq.load_model(model, "saliency", tokenizer=tok).attribute(
        PROMPT, generated_texts=PROMPT + " clause is executed.", show_progress=False
    )
    (sequence,) = result.sequence_attributions
    n = len(tok(PROMPT + " clause is executed.").input_ids)
    assert sequence.target[0].token == tok.bos_token and len(sequence.target) == n
    assert tuple(sequence.target_attributions.shape) == (n, 4, model.config.n_embd)  # positions, steps, hidden
