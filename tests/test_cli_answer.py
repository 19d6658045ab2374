"""`backprop-hooks explain-answer`: a Hugging Face causal LM saved in a folder (offline), an answer against a foil,
the heat-map (PNG), the page (HTML) and the numbers (JSON) written; a generated answer; one line for a bad model."""

import json

import pytest

from backprop_hooks.cli import main

from _tokenizer import gpt2, tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm")
    gpt2().float().save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def test_an_answer_against_a_foil(folder, tmp_path, capsys):
    argv = ["explain-answer", "--model", str(folder), "--prompt", "A break statement", "--answer", " terminates"]
    assert main(argv + ["--foil", " continues", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "answer ' terminates'" in printed and "foil ' continues'" in printed and "for:" in printed
    numbers = json.loads((tmp_path / "answer.json").read_text())
    steps = len(numbers["answer_ids"][0])
    assert len(numbers["matrix"][0]) == steps and len(numbers["total"][0]) == numbers["prompt_length"] + steps
    assert "".join(numbers["tokens"][0][numbers["prompt_length"] :]) == " terminates"
    assert numbers["method"] == "attnlrp" and numbers["target"] == "log_softmax" and "foil_total" in numbers
    assert (tmp_path / "answer.png").read_bytes().startswith(b"\x89PNG")
    assert "<table" in (tmp_path / "answer.html").read_text()


def test_a_generated_answer_and_the_whole_answer_only(folder, tmp_path):
    argv = ["explain-answer", "--model", str(folder), "--max-new-tokens", "2", "--no-steps", "--out", str(tmp_path)]
    assert main(argv + ["--method", "input_x_gradient"]) == 0
    numbers = json.loads((tmp_path / "answer.json").read_text())
    assert 1 <= len(numbers["answer_ids"][0]) <= 2 and "matrix" not in numbers


def test_a_model_that_is_not_there_is_one_line(tmp_path, capsys):
    assert main(["explain-answer", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not load a causal language model" in err
