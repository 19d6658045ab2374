"""Token heat-maps (HTML and terminal), the bundled text classifier (shipped weights load and score as
recorded; retraining reproduces them: slow) and the explain-text command."""

import re

import pytest
import torch

import backprop_hooks as bh
from backprop_hooks import cli
from backprop_hooks.eval import tokens as render
from backprop_hooks.models import text_topics


@pytest.fixture(scope="module")
def classifier():
    return text_topics.load()


def test_terminal_and_html_colours():
    toks, scores = ["a", "<b>", "c"], [2.0, -1.0, 0.0]
    line = render.terminal(toks, scores)
    assert "\x1b[48;2;255;0;0m" in line  # the largest positive score: full red
    assert "\x1b[48;2;128;128;255m" in line  # half the largest magnitude, negative: half blue
    assert "\x1b[48;2;255;255;255m" in line  # zero: white
    assert render.terminal(toks, scores, color=False) == "a(+2) <b>(-1) c(+0)"
    page = render.html([(toks, scores, "caption & more")])
    assert page.startswith("<!DOCTYPE html>") and "&lt;b&gt;" in page and "caption &amp; more" in page
    assert "rgb(255,0,0)" in page and "<script" not in page and "http" not in page  # self-contained


def test_rows_drop_padding(classifier):
    model, tokenizer = classifier
    sentences = ["Return a copy of the string.", "The raise statement re-raises the exception currently handled."]
    ids, mask = tokenizer(sentences)
    e = bh.explain_text(model, ids, mask, "input_x_gradient", "weighted")
    rows = render.rows(e, [tokenizer.tokens(s) for s in sentences], list(text_topics.CLASSES))
    assert [len(r[0]) for r in rows] == [int(m) for m in mask.sum(1)]
    assert rows[0][1] == pytest.approx(e.attributions[0, : len(rows[0][0])].tolist())
    with pytest.raises(ValueError, match="real tokens"):
        render.rows(e, [["x"], ["y"]])


def test_shipped_classifier_scores_as_recorded(classifier):
    model, tokenizer = classifier
    checkpoint = torch.load(text_topics.WEIGHTS, weights_only=True)
    assert text_topics.WEIGHTS.stat().st_size < 1_000_000
    _, test = text_topics.dataset()
    assert text_topics.accuracy(model, tokenizer, test) == pytest.approx(checkpoint["test_accuracy"], abs=0.01)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_training_reproduces_the_shipped_classifier(tmp_path):
    assert text_topics.main(["--out", str(tmp_path / "w.pt")]) == 0
    new, old = (torch.load(p, weights_only=True) for p in (tmp_path / "w.pt", text_topics.WEIGHTS))
    assert new["vocab"] == old["vocab"]
    assert new["test_accuracy"] == pytest.approx(old["test_accuracy"], abs=0.03)  # bitwise on the same CPU


def test_explain_text_command(tmp_path, capsys):
    page = tmp_path / "t.html"
    code = cli.main(
        ["explain-text", "Return a copy of the string.", "--target", "weighted", "versus:numbers", "--no-color"]
        + ["--method", "input_x_gradient", "--html", str(page)]
    )
    out = capsys.readouterr().out
    assert code == 0 and page.is_file()
    assert "and not numbers" in out and re.search(r"string\([+-]", out)
    assert cli.main(["explain-text", "x y z", "--target", "versus:nope"]) == 2
    err = capsys.readouterr().err
    assert "no class is called 'nope'" in err and "'numbers'" in err  # the message lists the classes
