"""Token heat-maps (HTML and terminal), the bundled text classifier (shipped weights load and score as
recorded; retraining reproduces them: slow) and the explain-text command."""

import re

import pytest
import torch

import backprop_hooks as bh
from backprop_hooks import cli
from backprop_hooks.eval import tokens as render
from backprop_hooks.models import text_topics
from backprop_hooks.plotting import tokens as views


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


# ---- what the heat-map says: the objective, the probability, the class names, the scale ----------------------


def scored(scores, target="weighted", versus=None) -> bh.Explanation:
    """A text explanation of one sequence with the given scores (classes: 3, the explained one 2)."""
    scores = torch.tensor([scores], dtype=torch.float64)
    ids = torch.arange(scores.shape[1])[None]
    extras = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if versus is not None:
        extras["versus"] = versus
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    return bh.Explanation(scores, logits, torch.tensor([2]), "ixg", target, True, tuple(ids.shape), extras=extras)


def test_the_caption_names_the_foil_and_the_probability():
    (row,) = render.rows(scored([1.0, -1.0], "versus", versus=0), None, ["exc", "str", "num"])
    assert row[2] == "num (2) and not exc (0) · p = 0.665 · ixg"
    (row,) = render.rows(scored([1.0, -1.0]), None)  # no names: the indices
    assert row[2] == "class 2, weighted contrast · p = 0.665 · ixg"


def test_a_hugging_face_configs_labels_name_the_classes():
    import transformers

    torch.manual_seed(0)
    tiny = dict(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = transformers.BertConfig(id2label={0: "negative", 1: "positive"}, **tiny)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.tensor([[2, 7, 9, 3]])
    e = bh.explain_text(model, ids, target=bh.targets.Versus(0), classes=1)
    assert "positive (1) and not negative (0) · p = " in e._repr_html_()
    default = transformers.BertForSequenceClassification(
        transformers.BertConfig(**{**config.to_dict(), "id2label": None})
    )
    assert "class 1" in bh.explain_text(default.eval(), ids, classes=1)._repr_html_()  # not transformers' LABEL_1


def test_one_dominant_token_leaves_the_others_coloured():
    toks, scores = ["a", "b", "c", "d", "e"], [13.3, 0.66, -0.33, 0.2, 0.0]
    assert views.limit(scores) == (0.66, 1) and views.limit(scores, "max") == (13.3, 0)
    assert views.limit([1.0, 0.9, 0.5]) == (1.0, 0)  # nobody dominates: the largest
    assert views.limit([9.0, 8.0] + [0.5] * 18) == (0.5, 2)  # two of twenty may be clipped
    line = render.terminal(toks, scores)
    assert "\x1b[48;2;255;0;0m\x1b[38;2;0;0;0m b " in line  # 0.66 at full red
    assert "\x1b[48;2;128;128;255m" in line and "\x1b[4ma(+13.3)" in line  # -0.33: half blue; a: marked
    page = render.html([(toks, scores, "caption")])
    assert page.count("outline:2px solid #000") == 1 and "dominate" in page and "1 token beyond it" in page
    assert "+13.3 (beyond the scale)" in page
    plain = render.html([(toks, scores, "caption")], scale="max")
    assert "outline" not in plain and "rgb(255,242,242)" in plain  # 0.66 of 13.3: almost white
    e = scored(scores)
    fig, flat = e.plot(), e.plot(scale="max")
    from _pixels import pixels, red

    assert red(pixels(fig)) > red(pixels(flat)) + 200
    assert "dominant tokens clipped" in fig.axes[-1].get_xlabel() and "clipped" not in flat.axes[-1].get_xlabel()
    with pytest.raises(bh.errors.OptionError, match="'robust', 'max'"):
        render.html([(toks, scores, "caption")], scale="p99")
