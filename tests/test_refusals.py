"""What a new user hits, refused with one typed line: NaN or Inf logits (every method, text too), a class
explained against itself (``Versus``), an all-padding row, token ids outside the vocabulary, sequences longer
than the model's positions, option typos and options a method does not take, token ids given to ``explain``."""

import copy
import warnings

import pytest
from hypothesis import given, strategies as st
import timm
import torch
import transformers
from torch import nn

import backprop_hooks as bh
from backprop_hooks import errors, testing
from backprop_hooks.token_checks import check_rows_vocabulary, position_limit

from _hf import VOCAB, build, text_inputs

TOKEN_METHODS = [m for m in bh.methods.available() if bh.methods.get(m).space == "tokens"]
IMAGE_METHODS = [m for m in bh.methods.available() if m not in TOKEN_METHODS]
OPTIONS = {"smoothgrad": {"n_samples": 2, "seed": 0}, "integrated_gradients": {"n_steps": 2}}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", errors.BackpropHooksWarning)
        yield


def cnn(classes: int = 4) -> nn.Module:
    return testing.randomize(testing.CNN(3, 6, 3, 1, classes), seed=0)


def vit() -> nn.Module:
    torch.manual_seed(0)
    opts = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)
    return timm.models.VisionTransformer(**opts).double().eval()


def refused(error: type, match: str, call, *args, **kwargs) -> str:
    """The message of the typed error ``call`` raises (a BackpropHooksError of class ``error``)."""
    with pytest.raises(errors.BackpropHooksError, match=match) as info:
        call(*args, **kwargs)
    assert isinstance(info.value, error), type(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------ non-finite logits
@pytest.mark.parametrize("method", bh.methods.available())
def test_every_method_refuses_non_finite_logits(method):
    model, x = (vit(), torch.rand(3, 3, 32, 32, dtype=torch.float64)) if method in TOKEN_METHODS else (cnn(), None)
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64) if x is None else x
    head = model.head
    with torch.no_grad():
        head.bias[:2] = float("nan")  # a NaN weight: every sample, two classes
    before = testing.model_state(model)
    message = refused(errors.ModelOutputError, "NaN or Inf", bh.explain, model, x, method, **OPTIONS.get(method, {}))
    assert f"samples [0, 1, 2] (2 of {head.out_features} classes)" in message and "weights" in message
    testing.assert_same_state(model, before)


class NaNWhereLarge(nn.Module):
    """A CNN whose logits of classes 0 and 1 are NaN for inputs whose first value exceeds ``above``, or falls
    below ``below``."""

    def __init__(self, above: float = float("inf"), below: float = -float("inf")):
        super().__init__()
        self.net, self.above, self.below = cnn(3), above, below

    def forward(self, x):
        first = x.flatten(1)[:, :1]
        bad = ((first > self.above) | (first < self.below)) & (torch.arange(3) < 2)
        return self.net(x).masked_fill(bad, float("nan"))


def test_non_finite_logits_name_their_samples_and_classes():
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    x[1, 0, 0, 0] = 5.0
    refused(errors.ModelOutputError, r"in samples \[1\] \(2 of 3 classes\)", bh.explain, NaNWhereLarge(1), x)
    assert bh.explain(NaNWhereLarge(1), x, check_finite=False).logits.isnan().any()  # the escape: no check


def test_non_finite_logits_at_the_path_points_of_integrated_gradients():
    """Finite at the input, NaN at sample 1's points near the zero baseline (Gauss-Legendre nodes 0.21, 0.79)."""
    x = torch.full((2, 3, 6, 6), 0.9, dtype=torch.float64)
    x[1, 0, 0, 0] = 0.1  # 0.21 * 0.1 < 0.05: NaN at a path point; sample 0's 0.21 * 0.9 is not
    model = NaNWhereLarge(below=0.05)
    assert torch.isfinite(model(x)).all()
    refused(
        errors.ModelOutputError,
        r"at the points integrated_gradients evaluates in samples \[1\] \(2 of 3 classes\)",
        bh.explain,
        model,
        x,
        "integrated_gradients",
        n_steps=2,
    )


@pytest.mark.parametrize("method", ["input_x_gradient", "integrated_gradients", "attnlrp", "grad_rollout"])
def test_text_refuses_non_finite_logits(method):
    bert = build("bert")
    with torch.no_grad():
        bert.classifier.bias[1] = float("inf")
    ids, mask = text_inputs("bert")
    options = {"n_steps": 2} if method == "integrated_gradients" else {}
    message = refused(errors.ModelOutputError, "NaN or Inf", bh.explain_text, bert, ids, mask, method, **options)
    assert "samples [0, 1, 2] (1 of 3 classes)" in message


# ------------------------------------------------------------------------------------ degenerate requests
def test_versus_against_the_explained_class_is_refused():
    model, x = cnn(), torch.rand(3, 3, 6, 6, dtype=torch.float64)
    versus = bh.targets.Versus
    refused(
        errors.ClassIndexError,
        r"samples \[0, 1, 2\] explain classes \[2, 2, 2\]",
        bh.explain,
        model,
        x,
        "gradient",
        versus(2),
        2,
    )
    per_sample = (versus(torch.tensor([0, 3, 1])), torch.tensor([1, 3, 0]))
    message = refused(
        errors.ClassIndexError, r"samples \[1\] explain classes \[3\]", bh.explain, model, x, "lrp", *per_sample
    )
    assert "against themselves" in message and "foil" in message
    refused(errors.ClassIndexError, "against themselves", bh.explain, model, x, "smoothgrad", versus(1), 1, n_samples=2)
    refused(
        errors.ClassIndexError, "against themselves", bh.compare, model, x[:1], ["gradcam"], ["logit", versus(1)], 1
    )
    bh.explain(model, x, "gradient", versus(1), 2)  # another class: fine


def test_text_versus_and_all_padding_rows_are_refused():
    bert = build("bert")
    ids, mask = text_inputs("bert")
    versus = bh.targets.Versus(torch.tensor([0, 2, 2]))
    refused(
        errors.ClassIndexError,
        r"samples \[2\] explain classes \[2\]",
        bh.explain_text,
        bert,
        ids,
        mask,
        target=versus,
        classes=torch.tensor([1, 1, 2]),
    )
    empty = mask.clone()
    empty[1] = 0
    message = refused(errors.InputError, r"attention_mask rows \[1\] are all 0", bh.explain_text, bert, ids, empty)
    assert "at least one token" in message


# ------------------------------------------------------------------------------------ token ids and positions
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_token_ids_outside_the_vocabulary_are_named_before_anything_runs(name):
    model = build(name)
    ids, mask = text_inputs(name)
    calls = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        for bad in (VOCAB, VOCAB + 7, -1):
            wrong = ids.clone()
            wrong[2, 3] = bad
            refused(
                errors.InputError,
                rf"token id {bad} at position \(2, 3\) .* vocabulary of {VOCAB} tokens \(ids 0..{VOCAB - 1}\)",
                bh.explain_text,
                model,
                wrong,
                mask,
            )
    finally:
        handle.remove()
    assert not calls


def bert_with_positions(n: int) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=n, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).double().eval()


def test_sequences_longer_than_the_positions_are_refused():
    last = {"logits": lambda out: out.logits[:, -1]}  # a causal LM's next token
    cases = [(build("gpt2"), 32, last), (bert_with_positions(16), 16, {}), (build("roberta"), 38, {})]  # 40 - pad - 1
    for model, limit, read in cases:
        assert position_limit(model) == limit
        long = torch.randint(2, VOCAB, (2, limit + 1))
        message = f"{limit + 1} tokens, the model has {limit} positions"
        refused(errors.InputError, message, bh.explain_text, model, long, **read)
        bh.explain_text(model, long[:, :limit], **read)  # at the limit: runs
    llama = build("llama")  # rotary positions: no hard limit, never refused
    assert position_limit(llama) is None
    assert bh.explain_text(llama, torch.randint(2, VOCAB, (1, 40)), **last).attributions.shape == (1, 40)


def test_token_ids_given_to_explain_point_to_explain_text():
    gpt2, bert = build("gpt2"), build("bert")
    ids, _ = text_inputs("bert")
    refused(errors.InputError, r"token ids: explain them with bh.explain_text\(model, input_ids", bh.explain, gpt2, ids)
    refused(errors.InputError, r"token ids: explain them with bh.explain_text", bh.compare, bert, ids, ["gradient"])
    mlp = testing.randomize(testing.MLP(4, 5, 1, 3), seed=0)
    message = refused(errors.InputError, r"use x.float\(\)", bh.explain, mlp, torch.ones(2, 4, dtype=torch.long))
    assert "bh.explain_text" in message  # an integer (B, F) input without embeddings: either may be meant
    message = refused(
        errors.InputError, r"use x.float\(\)", bh.explain, cnn(), torch.ones(2, 3, 6, 6, dtype=torch.uint8)
    )
    assert "explain_text" not in message  # an integer image


# ------------------------------------------------------------------------------------ options
def test_option_typos_name_the_methods_options():
    model, x = cnn(), torch.rand(2, 3, 6, 6, dtype=torch.float64)
    message = refused(
        errors.OptionError,
        r"method 'integrated_gradients' has no option 'n_step' \(did you mean 'n_steps'\?\); its options: 'n_steps'",
        bh.explain,
        model,
        x,
        "integrated_gradients",
        n_step=8,
    )
    assert "_ManyPoints" not in message
    refused(
        errors.OptionError,
        r"'gradient' has no option 'layer', an option of 'gradcam'",
        bh.explain,
        model,
        x,
        layer="stem",
    )
    refused(
        errors.OptionError,
        r"no option 'epsilonn' \(did you mean 'epsilon'\?\)",
        bh.explain,
        model,
        x,
        "lrp",
        epsilonn=1,
    )
    refused(
        errors.OptionError,
        r"LRP composite 'epsilon' has no option 'low'",
        bh.explain,
        model,
        x,
        "lrp",
        composite="epsilon",
        low=0,
    )
    refused(
        errors.OptionError,
        r"'gradcam' has no option 'layr' \(did you mean 'layer'\?\)",
        bh.methods.create,
        "gradcam",
        model,
        layr="stem",
    )
    refused(
        errors.OptionError,
        r"bh.explain with method 'gradient' .*'clases' \(did you mean 'classes'",
        bh.explain,
        model,
        x,
        clases=1,
    )
    bert = build("bert")
    ids, mask = text_inputs("bert")
    refused(
        errors.OptionError, r"'reduction' \(did you mean 'reduce'\?\)", bh.explain_text, bert, ids, mask, reduction="l1"
    )
    refused(
        errors.OptionError,
        r"did you mean 'n_steps'",
        bh.explain_text,
        bert,
        ids,
        mask,
        "integrated_gradients",
        n_step=2,
    )


def test_explain_generation_checks_options_before_generating():
    gpt2 = build("gpt2")
    prompt = torch.randint(2, VOCAB, (1, 4))
    message = r"bh.explain_generation with method 'smoothgrad' has no option 'n_sample' \(did you mean 'n_samples'"
    refused(errors.OptionError, message, bh.explain_generation, gpt2, prompt, method="smoothgrad", n_sample=2)


def test_compare_checks_every_methods_options_before_explaining(monkeypatch):
    model, x = cnn(), torch.rand(1, 3, 6, 6, dtype=torch.float64)
    calls = []
    monkeypatch.setattr(bh.api, "explain", lambda *a, **k: calls.append(1))
    options = {"gradcam": {"layer": "stem"}, "smoothgrad": {"n_sample": 2}}
    refused(
        errors.OptionError,
        r"'smoothgrad' has no option 'n_sample' \(did you mean 'n_samples'\?\)",
        bh.compare,
        model,
        x,
        ["gradcam", "smoothgrad"],
        options=options,
    )
    assert not calls


def test_method_options_are_the_constructor_keywords():
    assert bh.methods.get("gradient").options() == ["check_finite"]
    assert bh.methods.get("gradcam").options() == ["layer", "relu", "check_finite"]
    assert set(bh.methods.get("integrated_gradients").options()) == {
        "n_steps", "baseline", "quadrature", "pointwise", "internal_batch_size", "check_finite",
    }  # fmt: skip
    assert {"composite", "epsilon", "low", "high", "gamma"} <= set(bh.methods.get("lrp").options())
    for name in bh.methods.available():  # every listed option is accepted by the constructor
        cls = bh.methods.get(name)
        assert "model" not in cls.options()
        model = vit() if name in TOKEN_METHODS else cnn()
        bh.methods.create(name, copy.deepcopy(model), check_finite=True)


def test_the_command_line_draws_a_class_against_itself_as_its_zero_map():
    """``backprop-hooks explain --target versus:S`` with S among the classes: the library refuses that row, the
    command line explains the others and draws S's row as the zero map it is by definition."""
    from backprop_hooks.eval.class_explanations import explain_classes

    model, image = cnn(), torch.rand(3, 6, 6, dtype=torch.float64)
    result = explain_classes(model, image, "gradcam", ["versus:1"], classes=[0, 1, 2])
    e = result.explanations["versus:1"]
    assert e.classes.tolist() == [0, 1, 2] and e.extras["versus"] == 1
    assert torch.equal(e.maps[1], torch.zeros_like(e.maps[1]))
    for row in (0, 2):
        alone = bh.explain(model, image[None], "gradcam", bh.targets.Versus(1), row).maps[0]
        torch.testing.assert_close(e.maps[row], alone)


@given(rows=st.lists(st.lists(st.integers(-2, 11), max_size=6), max_size=5))
def test_rows_vocabulary_names_the_first_id_outside_as_a_loop_would(rows):
    """The vectorised check of rows of any lengths names the first id outside 0..9 and its (row, column)."""
    first = next(((i, j, t) for i, r in enumerate(rows) for j, t in enumerate(r) if not 0 <= t < 10), None)
    if first is None:
        check_rows_vocabulary(rows, nn.Embedding(10, 2), "foil_ids")
        return
    i, j, t = first
    with pytest.raises(errors.InputError, match=rf"token id {t} at position \({i}, {j}\) of foil_ids .* 10 tokens"):
        check_rows_vocabulary(rows, nn.Embedding(10, 2), "foil_ids")
