"""Attention capture on Hugging Face models, per function call: against HF's own output_attentions=True
under eager attention (probabilities and the gradients through them), for models built with sdpa and with
eager; masks (padding, causal, relative position bias); bit-identical logits; the model left as it was
(config._attn_implementation included); token layouts from HF configs; grad_rollout on HF ViT/DeiT/BEiT
against a rollout written from the oracle's tensors; timm without fused attention."""

import copy
import warnings

import pytest
import timm
import torch

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.methods.rollout import fuse_heads, rollout
from backprop_hooks.methods.tokens import token_layout
from backprop_hooks.rules.attention import AttentionCapture, sdpa_explicit

from _hf import TEXT_MODELS, VISION_MODELS, build, model_inputs, pixels


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)
        yield


def seed_like(y):
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)


def eager_oracle(model, kwargs):
    """Logits, attentions and ∂(seed·logits)/∂A from a copy of the model switched to eager attention."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    out = ref(**kwargs, output_attentions=True)
    grads = torch.autograd.grad(out.logits, out.attentions, seed_like(out.logits))
    return out.logits.detach(), [a.detach() for a in out.attentions], grads


FAST = {("bert", "sdpa"), ("gpt2", "sdpa"), ("vit", "sdpa"), ("beit", "sdpa")}
CASES = [
    pytest.param(n, a, marks=() if (n, a) in FAST else pytest.mark.slow)
    for n in TEXT_MODELS + VISION_MODELS
    for a in ("sdpa", "eager")
]


@pytest.mark.parametrize("name, attn", CASES)
def test_capture_equals_hf_output_attentions_and_keeps_the_model(name, attn):
    model, kwargs = build(name, attn), model_inputs(name)
    before = testing.model_state(model)
    plain = model(**kwargs).logits.detach()  # with grad enabled, as the capture runs (SDPA picks its kernel by it)
    y_ref, a_ref, g_ref = eager_oracle(model, kwargs)
    capture = AttentionCapture()
    with capture.recording():
        y = model(**kwargs).logits
    pairs = capture.gradients(y, seed_like(y.detach()))
    assert torch.equal(y.detach(), plain)  # bit-identical: the model's own numbers
    assert len(pairs) == len(a_ref) == 2
    # HF's vision models take their eager softmax in float32 (dtype=torch.float32): the oracle is float32-exact
    tol = 1e-7 if name in VISION_MODELS else 1e-12
    for (a, g), r, gr in zip(pairs, a_ref, g_ref):
        torch.testing.assert_close(a.detach().to(r.dtype), r, rtol=0, atol=tol)
        torch.testing.assert_close(g.to(gr.dtype), gr, rtol=1e-9 if tol < 1e-9 else 1e-5, atol=tol)
    torch.testing.assert_close(y.detach(), y_ref, rtol=0, atol=100 * tol)
    assert model.config._attn_implementation == attn
    testing.assert_same_state(model, before)
    assert not capture.recording_active


def test_padded_keys_get_zero_attention_and_causal_rows_see_no_future():
    for name in ("bert", "gpt2"):
        model, kwargs = build(name), model_inputs(name)
        capture = AttentionCapture()
        with capture.recording():
            y = model(**kwargs).logits
        mask = kwargs["attention_mask"]
        for a, _ in capture.gradients(y, torch.ones_like(y)):
            assert torch.all(a.detach().masked_select((mask == 0)[:, None, None, :].expand_as(a)) == 0)
            if name == "gpt2":
                assert torch.all(a.detach().triu(1) == 0)


def test_sdpa_explicit_matches_the_kernel_on_every_mask_kind():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    boolean = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    boolean[..., 0] = True  # every query keeps a key
    additive = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    kv2 = (k[:, :2], v[:, :2])
    cases = [
        dict(),
        dict(is_causal=True),
        dict(attn_mask=boolean),
        dict(attn_mask=additive),
        dict(scale=0.3),
    ]
    F = torch.nn.functional
    for kw in cases:
        out, attn = sdpa_explicit(q, k, v, **kw)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kw), rtol=0, atol=1e-12)
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn[..., 0]), rtol=0, atol=1e-12)
    out, _ = sdpa_explicit(q, *kv2, enable_gqa=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, *kv2, enable_gqa=True), rtol=0, atol=1e-12)


def test_capture_refuses_attention_dropout():
    model, kwargs = build("bert"), model_inputs("bert")
    model.train()
    capture = AttentionCapture()
    with pytest.raises(bh.errors.RuleError, match="eval mode"), capture.recording():
        model(**kwargs)
    assert not capture.recording_active


# ---------------------------------------------------------------------------------------- layouts
def test_token_layouts_from_hf_configs():
    x = pixels()
    vit, deit, beit = (build(n) for n in VISION_MODELS)
    assert token_layout(vit, x) == bh.methods.TokenLayout(1, (4, 4), (0,))
    assert token_layout(deit, x) == bh.methods.TokenLayout(2, (4, 4), (0, 1))  # class + distillation tokens
    assert token_layout(beit, x) == bh.methods.TokenLayout(1, (4, 4), None)  # mean-pooled head
    assert token_layout(vit, torch.zeros(1, 3, 32, 48)).grid == (4, 6)


def reference_grad_rollout(model, x, layout):
    """grad_rollout written from the eager oracle's A_l and ∂f/∂A_l (seed: weighted contrast)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    out = ref(pixel_values=x, output_attentions=True)
    seed = bh.targets.get("weighted").seed(out.logits.detach(), out.logits.detach().argmax(1))
    grads = torch.autograd.grad(out.logits, out.attentions, seed)
    mats = [fuse_heads(g * a.detach()) for a, g in zip(out.attentions, grads)]
    flow = rollout(mats, rows=layout.readout_rows(mats[0]))
    return layout.to_grid(flow[:, 0])


@pytest.mark.parametrize("name", ["vit"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("deit", "beit")])
def test_grad_rollout_on_hf_vision_models_equals_the_eager_reference(name):
    model, x = build(name), pixels()
    before = testing.model_state(model)
    e = bh.explain(model, x, "grad_rollout", "weighted")
    assert e.attributions.shape == (2, 4, 4) and e.maps.shape == (2, 32, 32)
    want = reference_grad_rollout(model, x, token_layout(model, x))
    torch.testing.assert_close(e.attributions, want, rtol=1e-5, atol=1e-7)  # float32 eager softmax (see above)
    testing.assert_same_state(model, before)
    assert model.config._attn_implementation == "sdpa"


def test_every_attention_method_runs_on_hf_vit():
    model, x = build("vit"), pixels()
    for method in ("rollout", "grad_rollout", "transformer_attribution", "vit_gradcam"):
        e = bh.explain(model, x, method, "weighted")
        assert e.attributions.shape == (2, 4, 4) and torch.isfinite(e.attributions).all()
    assert bh.methods.ViTGradCAM(model).layer == "vit.layers.0"  # the last block's input


def test_timm_without_fused_attention_equals_fused():
    """timm's explicit path (fused_attn=False) is captured at its softmax: same maps as the fused path."""
    torch.manual_seed(0)
    opts = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    fused = timm.models.VisionTransformer(**opts).double().eval()
    explicit = copy.deepcopy(fused)
    for block in explicit.blocks:
        block.attn.fused_attn = False
    x = pixels()
    for method in ("transformer_attribution",):  # the hold gate included
        a = bh.explain(fused, x, method, "weighted").attributions
        b = bh.explain(explicit, x, method, "weighted").attributions
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert not any(block.attn.fused_attn for block in explicit.blocks)


def test_capture_is_per_thread():
    """The function-level capture is thread-local: explanations from several threads at once equal the
    sequential one, and a thread that explains nothing sees no capture."""
    import threading

    model, x = build("vit"), pixels()
    want = bh.explain(model, x, "grad_rollout", "weighted").attributions
    plain = model(pixel_values=x).logits.detach()
    out, errors = {}, []

    def explain(i):
        out[i] = bh.explain(model, x, "grad_rollout", "weighted").attributions

    def forward():
        for _ in range(5):
            if not torch.equal(model(pixel_values=x).logits.detach(), plain):
                errors.append("changed")

    threads = [threading.Thread(target=explain, args=(i,)) for i in range(3)] + [threading.Thread(target=forward)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(out[i], want) for i in range(3))


def test_gate_held_reads_the_gate_off_any_gelu_module():
    """GateHeld (for Hugging Face's GELU modules) equals GELUHeld on nn.GELU, exact and tanh forms."""
    from transformers.activations import GELUActivation, NewGELUActivation

    from backprop_hooks.rules import GELUHeld
    from backprop_hooks.rules.gates import GateHeld

    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 0.0
    seed = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for ours, theirs in ((GELUActivation(), torch.nn.GELU()), (NewGELUActivation(), torch.nn.GELU("tanh"))):
        grads = []
        for module, rule in ((ours, GateHeld()), (theirs, GELUHeld())):
            xg = x.clone().requires_grad_(True)
            with bh.attach(module, {"": rule}):
                grads.append(torch.autograd.grad(module(xg), xg, seed)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
