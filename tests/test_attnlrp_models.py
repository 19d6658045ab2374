"""attnlrp on the models users have, unmodified: Hugging Face BERT / RoBERTa / DistilBERT / GPT-2 / Llama / ViT
/ DeiT / BEiT (random-init from configs) with either attention implementation and padding masks, timm ViTs
with and without fused attention, torchvision's ViT; equal to LXT 2.1 (the AttnLRP authors' library) where it
runs here, with every LXT patch undone afterwards; the bundled digits ViT and text classifier."""

import copy
import warnings

import pytest
import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks import testing
from bench import lxt

from _hf import VISION_MODELS, build, pixels, text_inputs

CAUSAL = ("gpt2", "llama")
FAST = {"bert", "llama", "vit"}
NAMES = [
    n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
    for n in ("roberta", "distilbert", "gpt2", "deit", "beit")
]
NAMES = ["bert", "llama", "vit"] + NAMES


def last_real(mask):
    """logits= for a right-padded causal LM: the next-token logits at each sequence's last real token."""
    return lambda out: out.logits[torch.arange(mask.shape[0]), mask.sum(1) - 1]


def explain(model, name, target="weighted", **options):
    if name in VISION_MODELS:
        return bh.explain(model, pixels(), "attnlrp", target, **options)
    ids, mask = text_inputs(name)
    logits = last_real(mask) if name in CAUSAL else None
    return bh.explain_text(model, ids, mask, method="attnlrp", target=target, logits=logits, **options)


@pytest.mark.parametrize("name", NAMES)
def test_sdpa_equals_eager_padding_is_zero_and_the_model_is_kept(name):
    sdpa, eager = build(name, "sdpa"), build(name, "eager")
    before = testing.model_state(sdpa)
    e, e_eager = explain(sdpa, name), explain(eager, name)
    # HF's vision models and Llama take their eager softmax in float32
    rtol = 1e-6 if name in VISION_MODELS + ["llama"] else 1e-9
    torch.testing.assert_close(
        e.attributions, e_eager.attributions, rtol=rtol, atol=rtol * float(e.attributions.abs().max())
    )
    assert e.linear and torch.isfinite(e.attributions).all() and e.attributions.abs().max() > 0
    if name not in VISION_MODELS:
        assert torch.all(e.attributions[text_inputs(name)[1] == 0] == 0)
    testing.assert_same_state(sdpa, before)
    assert sdpa.config._attn_implementation == "sdpa" and torch._C._len_torch_function_stack() == 0


def llama_method(model, ids, mask):
    def method(x, classes=None, target="logit"):
        return bh.explain_text(model, ids, mask, "attnlrp", target, classes, logits=last_real(mask))

    return method


def test_versus_and_padded_batch_on_a_language_model():
    """Llama-style next token: why t and not the foil is φ_t − φ_foil; a padded batch gives each sequence what it
    gets alone."""
    model = build("llama")
    ids, mask = text_inputs("llama")
    method = llama_method(model, ids, mask)
    correct, foil = torch.tensor([5, 9, 2]), torch.tensor([7, 3, 11])
    versus = method(ids, correct, bh.targets.Versus(foil)).attributions
    want = method(ids, correct).attributions - method(ids, foil).attributions
    torch.testing.assert_close(versus, want, rtol=1e-9, atol=1e-12)
    e = method(ids, target="weighted")
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        alone = bh.explain_text(
            model, ids[i : i + 1, :n], None, "attnlrp", "weighted", logits=lambda o: o.logits[:, -1]
        )
        torch.testing.assert_close(e.attributions[i : i + 1, :n], alone.attributions, rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_contrast_identities_over_the_whole_vocabulary():
    """Every target is its per-class composition over all 40 tokens of the vocabulary (40 logit explanations)."""
    model = build("llama")
    ids, mask = text_inputs("llama")
    testing.assert_contrast_identities(llama_method(model, ids, mask), ids, rtol=1e-8, targets=("weighted", "max"))


def small_timm_vit(seed=0):
    import timm

    torch.manual_seed(seed)
    return timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5
    ).double().eval()  # fmt: skip


def small_torchvision_vit(seed=0):
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zeroes the head: every gradient would be 0
    return model.double().eval()


def test_timm_fused_equals_explicit_attention():
    fused = small_timm_vit()
    explicit = copy.deepcopy(fused)
    for m in explicit.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    x = pixels()
    want = bh.explain(explicit, x, "attnlrp", "weighted").attributions
    torch.testing.assert_close(bh.explain(fused, x, "attnlrp", "weighted").attributions, want, rtol=1e-9, atol=1e-13)


def test_torchvision_vit_and_the_images_api():
    model = small_torchvision_vit()
    before = testing.model_state(model)
    e = bh.explain(model, pixels(), "attnlrp", "weighted")
    assert e.attributions.shape == (2, 3, 32, 32) and e.maps.shape == (2, 32, 32) and e.linear
    testing.assert_same_state(model, before)
    testing.assert_contrast_identities(bh.methods.AttnLRP(model), pixels(1), rtol=1e-8, targets=("weighted",))


# --------------------------------------------------------------------------------------- LXT's oracle
LXT_CASES = [
    ("llama", "sdpa", "attnlrp"),
    ("gpt2", "sdpa", "attnlrp"),
    ("gemma3", "sdpa", "attnlrp"),
    ("vit_torch", None, "cp_lrp"),
    pytest.param("llama", "eager", "attnlrp", marks=pytest.mark.slow),
    pytest.param("gpt2", "eager", "attnlrp", marks=pytest.mark.slow),
]


@pytest.mark.skipif(not lxt.installed(), reason="LXT is not installed")
@pytest.mark.parametrize("family, attn, composite", LXT_CASES)
def test_equals_lxt(family, attn, composite):
    """AttnLRP of LXT 2.1 (its own patch map for the family) on the same model and input: equal to 1e-4
    relative (measured: 4e-10 GPT-2, 6e-8 Llama, whose RMSNorm LXT computes in float32; 1.3e-7 Gemma 3, whose
    RMSNorm, scaled by 1 + weight, the model itself computes in float32 (16x off before that norm had its rule);
    1e-8 torchvision's ViT under CP-LRP, the map LXT has for it). LXT's BERT does not run on transformers 5
    (see bench/lxt.py)."""
    layer_norm_forward = nn.LayerNorm.forward
    if family == "vit_torch":
        model, x = small_torchvision_vit(), pixels()
        ours = bh.explain(model, x, "attnlrp", "weighted", composite=composite)
        seed = bh.targets.get("weighted").seed(ours.logits, ours.classes)
        forward, theirs_input, reduce = model, x, lambda r: r
    else:
        model = build(family, attn)
        ids = torch.randint(2, 40, (2, 9), generator=torch.Generator().manual_seed(1))
        ours = bh.explain_text(model, ids, method="attnlrp", target="weighted", logits=lambda out: out.logits[:, -1])
        seed = bh.targets.get("weighted").seed(ours.logits, ours.classes)
        theirs_input = model.get_input_embeddings()(ids).detach()
        forward, reduce = (lambda e: model(inputs_embeds=e).logits[:, -1]), (lambda r: r.sum(-1))
    target_module = __import__(lxt.FAMILIES[family][0], fromlist=["_"])
    module_state = dict(vars(target_module))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lxt.patched(family):
            assert nn.LayerNorm.forward is not layer_norm_forward or family in ("llama", "gemma3")
            theirs = reduce(lxt.relevance(forward, theirs_input, seed))
    scale = float(ours.attributions.abs().max())
    torch.testing.assert_close(ours.attributions, theirs, rtol=1e-4, atol=1e-4 * scale)
    # every LXT patch undone: classes, the modeling module, the transformers 5 shims
    assert nn.LayerNorm.forward is layer_norm_forward
    assert vars(target_module).keys() == module_state.keys()
    assert all(vars(target_module)[k] is v for k, v in module_state.items())
    import transformers.pytorch_utils

    assert not hasattr(transformers.pytorch_utils, "find_pruneable_heads_and_indices")


def test_gemma_norms_scale_by_one_plus_weight_and_others_by_weight():
    from backprop_hooks.rules.vit_relevance import is_rms_norm, rms_norm_offset

    gemma, llama = build("gemma3"), build("llama")
    norm = gemma.model.norm
    assert (
        is_rms_norm(norm)
        and rms_norm_offset(norm) == 1.0
        and rms_norm_offset(gemma.model.layers[0].self_attn.q_norm) == 1.0
    )
    assert is_rms_norm(llama.model.norm) and rms_norm_offset(llama.model.norm) == 0.0
    assert rms_norm_offset(nn.RMSNorm(4)) == 0.0


class _RMSNormNamedLayerNorm(nn.Module):
    """T5's norm: an RMSNorm called ``*LayerNorm`` that is no ``nn.LayerNorm`` (AttnLRP has no rule for it)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(size, dtype=torch.float64)), 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def test_a_norm_without_a_rule_is_named_not_left_silent():
    ids = torch.randint(2, 40, (1, 6), generator=torch.Generator().manual_seed(0))
    for family in ("gpt2", "llama", "gemma3"):  # every norm of these has its rule
        with warnings.catch_warnings():
            warnings.simplefilter("error", bh.errors.UncoveredModuleWarning)
            bh.explain_text(build(family), ids, method="attnlrp")
    model = build("llama")
    model.model.norm = _RMSNormNamedLayerNorm(32)
    with pytest.warns(bh.errors.UncoveredModuleWarning, match=r"_RMSNormNamedLayerNorm \(1: .*model\.norm\)"):
        bh.explain_text(model, ids, method="attnlrp")
    with warnings.catch_warnings():
        warnings.simplefilter("error", bh.errors.UncoveredModuleWarning)
        bh.explain_text(model, ids, method="attnlrp", norm=False)  # the user's choice: no norm rules, no warning


# -------------------------------------------------------------------------------------- bundled models
def test_bundled_digits_vit_and_text_classifier():
    from backprop_hooks import models
    from backprop_hooks.models import text_topics

    vit = models.create("digits_vit")
    x, t = models.digits("test")
    e = bh.explain(vit, x[:2], "attnlrp", "weighted", classes=t[:2])
    assert e.attributions.shape == (2, 3, 32, 32) and torch.isfinite(e.attributions).all()
    model, tokenizer = text_topics.load()
    ids, mask = tokenizer(["Return a copy of the string.", "The integer division of x by y."])
    e = bh.explain_text(model, ids, mask, "attnlrp", bh.targets.Versus(0))
    assert e.attributions.shape == ids.shape and torch.all(e.attributions[mask == 0] == 0)


@pytest.mark.slow
def test_explain_command_on_the_digits_vit(tmp_path):
    """``backprop-hooks explain --method attnlrp --model digits_vit`` (the figure, maps and summary)."""
    import json

    from backprop_hooks.cli import main

    assert main(["explain", "--method", "attnlrp", "--model", "digits_vit", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "chelsea.json").read_text())
    assert summary["method"] == "attnlrp" and all(t["linear"] for t in summary["targets"].values())


def test_explain_text_command_on_the_bundled_classifier(tmp_path, capsys):
    """``backprop-hooks explain-text --method attnlrp`` (terminal heat-maps and the HTML page)."""
    from backprop_hooks.cli import main

    html = tmp_path / "tokens.html"
    argv = ["explain-text", "Return a copy of the string.", "--method", "attnlrp", "--target", "logit", "weighted"]
    assert main(argv + ["--no-color", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert out.count("· attnlrp") == 2 and "string(" in out and html.is_file()


@pytest.mark.parametrize("name", ["gpt2_small", pytest.param("llama_small", marks=pytest.mark.slow)])
def test_bench_rows_beside_lxt(name, monkeypatch):
    """``python -m bench`` times attnlrp and, where LXT runs (GPT-2, Llama), LXT beside it in the same run;
    the LXT row computes what ours does (shrunk models here: only that it measures is checked)."""
    from bench import __main__ as harness
    from bench import zoo

    small = dict(gpt2_small=dict(n_embd=16, n_layer=1, n_head=2), llama_small=dict(hidden_size=16, intermediate_size=32,
                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    monkeypatch.setitem(zoo.HF_CAUSAL, name, small[name])
    rows = harness.bench_case(
        name, 2, 8, ["attnlrp"], ["logit", "weighted"], torch.device("cpu"), 1, True, False, False
    )
    impls = {(r["method"], r["target"], r["impl"]) for r in rows}
    assert {("attnlrp", "logit", "backprop_hooks"), ("attnlrp", "weighted", "backprop_hooks")} <= impls
    assert ("attnlrp", "logit", "lxt") in impls and all(r["seconds"] > 0 for r in rows)
    model, _, _, _ = zoo.build(name, torch.device("cpu"))
    x = zoo.make_input(name, model, 2, 8, torch.device("cpu"))
    t = torch.tensor([3, 5])
    theirs = bench_peer(model, x, t)
    ours = bh.explain(model, x, "attnlrp", classes=t).attributions
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5 * float(ours.abs().max()))


def bench_peer(model, x, t):
    from bench import peers

    return peers.peers("attnlrp", model, x, t, None)["lxt"]()


def test_conservation_measurement_agrees_with_explain_text():
    """eval/conservation.py's per-layer sums: CP-LRP with zero biases conserves at every hidden state; its input
    relevance is bh.explain_text's (the same rules, attached the same way)."""
    from backprop_hooks.eval import conservation

    model = conservation.zero_biases(build("bert"))
    ids, mask = text_inputs("bert", batch=2)
    mask[:] = 1
    embeds = model.get_input_embeddings()(ids).detach()

    def run(x):
        out = model(inputs_embeds=x, output_hidden_states=True)
        return out.logits, out.hidden_states

    for composite in ("cp_lrp", "attnlrp"):
        sums = conservation.relevance_sums(model, embeds, run, composite)
        e = bh.explain_text(model, ids, mask, "attnlrp", composite=composite)
        torch.testing.assert_close(sums["input"], e.attributions.sum(1), rtol=1e-9, atol=1e-14)
        if composite == "cp_lrp":
            ratio = sums["layers"] / sums["objective"][:, None]
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-9, atol=1e-9)


def test_the_bundled_language_model(tmp_path):
    from backprop_hooks.eval import tokens
    from backprop_hooks.models import python_docs_lm

    lm, tokenizer = python_docs_lm.load()
    ids = tokenizer("If the suite was exited for any reason other than an", return_tensors="pt").input_ids
    e = bh.explain_text(lm, ids, method="attnlrp", target="weighted", logits=lambda out: out.logits[:, -1])
    assert tokenizer.decode(e.classes[0]) == " exception" and e.logits.shape == (1, len(tokenizer))
    rows = tokens.rows(e, tokens.readable(tokenizer))
    assert rows[0][0][0] == "<|endoftext|>" and rows[0][0][-1] == "an" and len(rows[0][1]) == ids.shape[1]


@pytest.mark.slow
def test_the_language_model_trains(tmp_path):
    """python -m backprop_hooks.models.python_docs_lm, one epoch: it writes a directory that loads."""
    from backprop_hooks.models import python_docs_lm

    assert python_docs_lm.main(["--epochs", "1", "--out", str(tmp_path / "lm")]) == 0
    model, tokenizer = python_docs_lm.load(tmp_path / "lm")
    assert model.config.vocab_size == len(tokenizer) == python_docs_lm.VOCAB_SIZE
    assert sum(f.stat().st_size for f in (tmp_path / "lm").iterdir()) < 2_000_000
