"""ViT methods: attention capture under fused kernels (oracle: timm's explicit path), rollout against a
reference written here, layer pairing of gradients, GradCAM-on-tokens identities, prefix/register/distilled
tokens, non-square grids, torchvision's nn.MultiheadAttention, a clean model afterwards."""

import copy
import gc
import math
import warnings
import weakref

import pytest
import timm
import torch
import torchvision
from torch import nn

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.errors import RuleError, UnknownNameError
from backprop_hooks.errors import TokenLayoutError
from backprop_hooks.methods import GradRollout, Rollout, TransformerAttribution, ViTGradCAM
from backprop_hooks.methods.rollout import rollout
from backprop_hooks.rules.attention import AttentionCapture, AttentionValue, is_attention

ROLLOUTS = ["rollout", "grad_rollout", "transformer_attribution"]
ALL = ROLLOUTS + ["vit_gradcam"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)
        yield


def small_vit(seed: int = 0, dtype=torch.float64, **kw) -> nn.Module:
    """A timm ViT small enough for CPU tests; fused attention (timm's default) left on."""
    opts = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=5)
    opts.update(kw)
    torch.manual_seed(seed)
    return timm.models.VisionTransformer(**opts).to(dtype).eval()


def small_deit_distilled(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return (
        timm.models.deit.VisionTransformerDistilled(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5
        )
        .to(dtype)
        .eval()
    )


def small_torchvision_vit(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zeroes the head: every gradient would be 0
    return model.to(dtype).eval()


def inputs(b: int = 3, h: int = 32, w: int = 32, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def explicit_oracle(model: nn.Module, x: torch.Tensor, seed_fn=None):
    """A, ∂f/∂A and logits from a copy of a timm ViT with ``fused_attn=False`` (A is the input of attn_drop)."""
    ref = copy.deepcopy(model)
    found = []
    handles = []
    for block in ref.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: found.append(i[0])))
    y = ref(x)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(y, found, seed_fn(y.detach())) if seed_fn else None
    return y.detach(), [a.detach() for a in found], grads


def reference_rollout(attentions, prefix: int, fusion: str = "mean"):
    """Abnar & Zuidema, written out: (A + I)/2, rows normalised, multiplied from the first layer up."""
    joint = None
    for a in attentions:
        a = {"mean": a.mean(1), "max": a.max(1).values, "min": a.min(1).values}[fusion]
        a = (a + torch.eye(a.shape[-1], dtype=a.dtype)) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    return joint[:, 0, prefix:]


# ------------------------------------------------------------------------------------------ capture
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_capture_under_fused_attention_matches_explicit_path_and_keeps_output(dtype):
    model = small_vit(dtype=dtype)
    assert all(b.attn.fused_attn for b in model.blocks)
    x = inputs(dtype=dtype)
    before = testing.model_state(model)
    with torch.no_grad():
        plain = model(x)
    y_ref, a_ref, _ = explicit_oracle(model, x)
    capture = AttentionCapture()
    with bh.attach(model, {is_attention: capture}):
        y = model(x.requires_grad_(True))
    assert torch.equal(y.detach(), plain)  # the capture changes no number of the model's output
    assert len(capture.attentions) == len(model.blocks)
    assert [id(m) for m in capture.modules] == [id(b.attn) for b in model.blocks]
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for a, r in zip(capture.attentions, a_ref):
        torch.testing.assert_close(a.detach(), r, rtol=0, atol=tol)
    torch.testing.assert_close(plain, y_ref, rtol=0, atol=100 * tol)
    testing.assert_no_hooks_left(model)
    testing.assert_same_state(model, before)
    assert all(b.attn.fused_attn for b in model.blocks)


def test_captured_gradients_are_each_layers_own():
    model, x = small_vit(), inputs()

    def seed_fn(y):
        return torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)

    _, _, g_ref = explicit_oracle(model, x, seed_fn)
    capture = AttentionCapture()
    with bh.attach(model, {is_attention: capture}):
        y = model(x.requires_grad_(True))
        grads = torch.autograd.grad(y, capture.attentions, seed_fn(y.detach()))
    for g, r in zip(grads, g_ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_capture_reuses_the_models_own_projections():
    """The explicit path is built from the q, k, v the fused forward computed (taps on qkv/q_norm/k_norm):
    no Linear runs twice, and probabilities and their gradients equal the explicit oracle's, also with qk-norm."""
    for kw in ({}, {"qk_norm": True}):
        model, x = small_vit(**kw), inputs()
        calls = []
        hooks = [
            m.register_forward_hook(lambda m, i, o: calls.append(m))
            for m in model.modules()
            if isinstance(m, nn.Linear)
        ]
        model(x)
        plain_calls, calls[:] = len(calls), []
        capture = AttentionCapture()
        with bh.attach(model, {is_attention: capture}):
            y = model(x.requires_grad_(True))
            grads = torch.autograd.grad(y, capture.attentions, torch.ones_like(y))
        for h in hooks:
            h.remove()
        assert len(calls) == plain_calls
        _, a_ref, g_ref = explicit_oracle(model, x, torch.ones_like)
        for a, r, g, gr in zip(capture.attentions, a_ref, grads, g_ref):
            torch.testing.assert_close(a.detach(), r, rtol=0, atol=1e-12)
            torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-12)
        assert not capture.pending


def test_rollout_keeps_no_activations_for_a_backward():
    """Rollout never back-propagates: its forward saves nothing for autograd, so its peak tensor memory is the
    attention maps, well below a forward that records the graph (deterministic allocator count), with the
    same logits and the same map as a forward that does record it."""
    from bench.memory import peak_mib
    from bench.timing import forward

    model = small_vit(dtype=torch.float32, img_size=64, depth=4)
    x, cpu = torch.rand(4, 3, 64, 64), torch.device("cpu")
    method = Rollout(model)
    assert peak_mib(lambda: method(x), cpu) < 0.75 * peak_mib(forward(model, x), cpu)  # 1.6x before
    e = method(x)
    capture = AttentionCapture()
    with bh.attach(model, {is_attention: capture}):
        y = model(x.clone().requires_grad_(True))
    assert torch.equal(e.logits, y.detach())
    reference = reference_rollout([a.detach() for a in capture.attentions], prefix=1)
    torch.testing.assert_close(e.attributions.flatten(1), reference, rtol=1e-5, atol=1e-7)


def test_capture_on_multihead_attention_matches_need_weights():
    model, x = small_torchvision_vit(), inputs(2)
    plain = model(x)  # with gradients on, as the capture runs (the module picks its path by it)
    capture = AttentionCapture()
    with bh.attach(model, {is_attention: capture}):
        y = model(x)
    assert plain.abs().amax() > 0.1
    assert torch.equal(y.detach(), plain.detach())  # deferred: the module's own output, bit for bit
    assert all(a is None for a in capture.attentions)  # nothing computed beside the module in the forward
    (a, _), *_ = capture.gradients(y, torch.ones_like(y))
    # oracle: nn.MultiheadAttention's own weights (need_weights=True, per head) on the same block input
    block = model.encoder.layers[0]
    with torch.no_grad():
        tokens = model._process_input(x)
        tokens = torch.cat([model.class_token.expand(2, -1, -1), tokens], 1) + model.encoder.pos_embedding
        h = block.ln_1(tokens)
        _, w = block.self_attention(h, h, h, need_weights=True, average_attn_weights=False)
    assert capture.shapes[0] == w.shape
    torch.testing.assert_close(a, w, rtol=0, atol=1e-12)
    testing.assert_no_hooks_left(model)


def test_attention_value_returns_the_kernel_output_with_the_gradient_of_a_v():
    """AttentionValue: the values of ``out`` itself (no copy, in-place use allowed), the gradients of ``A v``
    for A and v, per head or through a head merge, with v broadcast over a batch dimension."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 5, 5, generator=g, dtype=torch.float64).softmax(-1).requires_grad_(True)
    v = torch.randn(1, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)  # broadcast over B
    seed = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    out = a.detach() @ v.detach() + 1.0  # any tensor: its values pass, the gradient is A v's
    got = AttentionValue.apply(a, v, out)
    assert torch.equal(got, out) and got.data_ptr() == out.data_ptr()
    want = torch.autograd.grad(a @ v, [a, v], seed)
    torch.testing.assert_close(torch.autograd.grad(got, [a, v], seed), want, rtol=1e-12, atol=1e-12)
    merged = out.transpose(1, 2).reshape(2, 5, 12)  # (B, N, heads·D), as a module's output

    def to_heads(t):
        return t.unflatten(-1, (3, 4)).transpose(1, 2)

    got = AttentionValue.apply(a, v, merged, to_heads)
    got.mul_(1.0)  # an in-place op on the result (models do this) is allowed
    torch.testing.assert_close(
        torch.autograd.grad(got, [a, v], seed.transpose(1, 2).reshape(2, 5, 12)), want, rtol=1e-12, atol=1e-12
    )


def test_held_multihead_attention_passes_the_value_path_only():
    """nn.MultiheadAttention under the capture: its output bit for bit, the plain gradients at its input and
    parameters equal to autograd's through the module, ∂f/∂A to the explicit path's, and with hold_attention
    the value path written out, W_vᵀ Aᵀ W_oᵀ g (for the input and the parameters)."""
    from backprop_hooks.rules.attention_maths import _mha_merge, _mha_probabilities

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=False).double().eval()
    params = list(mha.parameters())
    x = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)  # (L, B, E): not batch-first
    g = torch.randn(5, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain_out = mha(x, x, x, need_weights=False)[0]
    plain = torch.autograd.grad(plain_out, [x] + params, g)
    for hold in (False, True):
        capture = AttentionCapture(hold_attention=hold)
        with bh.attach(mha, {"": capture}):
            out = mha(x, x, x, need_weights=False)[0]
            [(a, grad_a)] = capture.gradients(out, g, retain_graph=True)
            got = torch.autograd.grad(out, [x] + params, g)
        assert torch.equal(out.detach(), plain_out.detach())
        with torch.no_grad():
            attn_ref, v_ref = _mha_probabilities(mha, x, x, x, with_values=True)
        a_leaf = attn_ref.clone().requires_grad_(True)
        path = _mha_merge(mha, a_leaf @ v_ref)
        torch.testing.assert_close(a, attn_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad_a, torch.autograd.grad(path, a_leaf, g)[0], rtol=1e-10, atol=1e-12)
        if not hold:
            torch.testing.assert_close(got, plain, rtol=1e-10, atol=1e-12)
            continue
        w_v, w_o = mha.in_proj_weight[16:].detach(), mha.out_proj.weight.detach()
        g_heads = (g.transpose(0, 1) @ w_o).view(2, 5, 2, 4).transpose(1, 2)
        want = ((a.transpose(-2, -1) @ g_heads).transpose(1, 2).reshape(2, 5, 8) @ w_v).transpose(0, 1)
        torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(got[0], plain[0])
        # the parameters: autograd of the explicit path with A held constant
        _, v_p = _mha_probabilities(mha, x.detach(), x.detach(), x.detach(), with_values=True)
        want_params = torch.autograd.grad(_mha_merge(mha, attn_ref @ v_p), params, g, allow_unused=True)
        for got_p, want_p in zip(got[1:], want_params):  # the query and key rows of in_proj get zero
            torch.testing.assert_close(got_p, torch.zeros_like(got_p) if want_p is None else want_p)
    testing.assert_no_hooks_left(mha)


def test_nothing_of_a_capture_outlives_it():
    """A capture, its attention maps and the graph they sit in are freed as soon as the last reference goes,
    without the garbage collector, and no explanation leaves a capture behind. (The graph's hold gates used to
    reference the capture: a cycle through autograd's C++ nodes that the collector cannot free, so every
    call leaked its attention maps, and a capture dropped without a backward pass its whole graph.)"""
    model, x = small_vit(), inputs()

    def captures():
        return sum(type(o) is AttentionCapture for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        before = captures()
        for per_module in (False, True):
            capture = AttentionCapture()
            if per_module:
                with bh.attach(model, {is_attention: capture}):
                    y = model(x.clone().requires_grad_(True))
            else:
                with capture.recording():
                    y = model(x.clone().requires_grad_(True))
            capture.gradients(y, torch.ones_like(y), retain_graph=True)  # a graph retained, pairs handed over
            graph = [t for t in capture.attentions + capture._probes if t is not None]
            refs = [weakref.ref(capture), weakref.ref(y)] + [weakref.ref(t) for t in graph]
            del capture, y, graph
            assert all(r() is None for r in refs)
        for model in (model, small_torchvision_vit()):
            for name in ROLLOUTS:
                bh.explain(model, x, name, "weighted")
        assert captures() == before
    finally:
        gc.enable()


def test_capture_refuses_active_dropout_and_other_modules():
    model = small_vit(attn_drop_rate=0.1).train()
    with pytest.raises(RuleError, match="eval"):
        with bh.attach(model, {is_attention: AttentionCapture()}):
            model(inputs(1).requires_grad_(True))
    testing.assert_no_hooks_left(model)
    with pytest.raises(RuleError, match="Attention"):
        bh.attach(model, {nn.Linear: AttentionCapture()})


# ------------------------------------------------------------------------------------------ rollout
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_equals_reference(fusion):
    model, x = small_vit(), inputs()
    _, a_ref, _ = explicit_oracle(model, x)
    got = Rollout(model, head_fusion=fusion)(x).attributions
    want = reference_rollout(a_ref, prefix=1, fusion=fusion).reshape(3, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_every_rolled_matrix_has_rows_summing_to_one():
    model, x = small_vit(depth=4), inputs()
    _, a_ref, _ = explicit_oracle(model, x)
    mats = [a.mean(1) for a in a_ref]
    for k in range(1, len(mats) + 1):
        rolled = rollout(mats[:k])
        assert (rolled >= 0).all()
        torch.testing.assert_close(rolled.sum(-1), torch.ones(rolled.shape[:2], dtype=rolled.dtype))


def test_discard_ratio_zeroes_the_weakest_entries():
    model, x = small_vit(), inputs()
    plain = Rollout(model)(x).attributions
    dropped = Rollout(model, discard_ratio=0.9)(x).attributions
    assert dropped.shape == plain.shape and not torch.allclose(dropped, plain)
    with pytest.raises(ValueError, match="discard_ratio"):
        Rollout(model, discard_ratio=1.0)
    with pytest.raises(ValueError, match="head fusion"):
        Rollout(model, head_fusion="median")


@pytest.mark.parametrize("method", ALL)
def test_batch_equals_per_sample(method):
    model, x = small_vit(), inputs(4)
    testing.assert_batch_equals_single(bh.methods.get(method)(model), x, target="weighted", rtol=1e-9, atol=1e-12)


def reference_grad_rollout(attentions, grads, prefix: int, clamp: bool):
    joint = None
    for a, g in zip(attentions, grads):
        m = (g * a).mean(1)
        m = m.clamp_min(0) if clamp else m
        m = (m + torch.eye(m.shape[-1], dtype=m.dtype)) / 2
        m = m / m.abs().sum(dim=-1, keepdim=True)
        joint = m if joint is None else m @ joint
    return joint[:, 0, prefix:]


@pytest.mark.parametrize("clamp", [False, True])
def test_grad_rollout_equals_reference(clamp):
    model, x = small_vit(), inputs()
    method = GradRollout(model, clamp=clamp)
    e = method(x, target="weighted")

    def seed_fn(y):
        return bh.targets.Weighted().seed(y, e.classes)

    _, a_ref, g_ref = explicit_oracle(model, x, seed_fn)
    want = reference_grad_rollout(a_ref, g_ref, 1, clamp).reshape(3, 4, 4)
    torch.testing.assert_close(e.attributions, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_grad_rollout_pairs_each_gradient_with_its_own_layer(layer):
    """Perturb one layer's gradient only: the result must equal the reference with exactly that layer's
    (A_l, G_l) pair changed (a reversed or shifted pairing pairs the perturbation with another A)."""
    model, x = small_vit(), inputs()
    noise = torch.randn(3, 2, 17, 17, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    class Perturbed(GradRollout):
        def attention_gradients(self, logits, seed, reduce, retain_graph=False):
            def perturbed(index, attn, grad):
                return reduce(index, attn, grad + noise if index == layer else grad)

            return super().attention_gradients(logits, seed, perturbed, retain_graph)

    e = Perturbed(model)(x, target="logit")
    _, a_ref, g_ref = explicit_oracle(model, x, lambda y: bh.targets.Logit().seed(y, e.classes))
    g_ref = list(g_ref)
    g_ref[layer] = g_ref[layer] + noise
    want = reference_grad_rollout(a_ref, g_ref, 1, False).reshape(3, 4, 4)
    torch.testing.assert_close(e.attributions, want, rtol=1e-9, atol=1e-12)
    plain = GradRollout(model)(x, target="logit").attributions
    assert not torch.allclose(e.attributions, plain)


def held_oracle(model: nn.Module, x: torch.Tensor, seed_fn):
    """An independent forward of a timm ViT with the held gates written out (σ of LayerNorm, Φ of GELU,
    A in the value path detached); returns ∂̃f/∂A_l for each layer."""

    def ln(mod, t):
        mu = t.mean(-1, keepdim=True)
        sd = (t.var(-1, unbiased=False, keepdim=True) + mod.eps).sqrt().detach()
        return (t - mu) / sd * mod.weight + mod.bias

    leaves = []
    t = model.patch_embed(x)
    t = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), t], 1) + model.pos_embed
    for blk in model.blocks:
        at = blk.attn
        b, n, d = t.shape
        q, k, v = at.qkv(ln(blk.norm1, t)).reshape(b, n, 3, at.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q * at.scale) @ k.transpose(-2, -1)).softmax(-1).detach().requires_grad_(True)
        leaves.append(a)
        t = t + at.proj((a @ v).transpose(1, 2).reshape(b, n, d))
        h = blk.mlp.fc1(ln(blk.norm2, t))
        h = h * (0.5 * (1 + torch.erf(h / math.sqrt(2)))).detach()
        t = t + blk.mlp.fc2(h)
    y = model.head(ln(model.norm, t)[:, 0])
    return torch.autograd.grad(y, leaves, seed_fn(y.detach()))


@pytest.mark.parametrize("clamp", [False, True])
def test_transformer_attribution_equals_reference(clamp):
    model, x = small_vit(), inputs()
    e = TransformerAttribution(model, clamp=clamp)(x, target="weighted")

    def seed_fn(y):
        return bh.targets.Weighted().seed(y, e.classes)

    _, a_ref, g_ref = explicit_oracle(model, x, seed_fn)
    h_ref = held_oracle(model, x, seed_fn)
    joint = None
    for a, g, h in zip(a_ref, g_ref, h_ref):
        m = g * (a * h)
        m = (m.clamp_min(0) if clamp else m).mean(1) + torch.eye(17, dtype=m.dtype)
        joint = m if joint is None else m @ joint
    torch.testing.assert_close(e.attributions, joint[:, 0, 1:].reshape(3, 4, 4), rtol=1e-9, atol=1e-12)


def test_transformer_attribution_is_blind_to_the_seed_sign_and_grad_rollout_is_not():
    """Documented property: G_l ⊙ R_l is quadratic in the seed, so 'why t not s' = 'why s not t'."""
    model, x = small_vit(), inputs(2)
    t, s = torch.tensor([0, 1]), torch.tensor([2, 3])
    ta = TransformerAttribution(model)
    torch.testing.assert_close(
        ta(x, classes=t, target=bh.targets.Versus(s)).attributions,
        ta(x, classes=s, target=bh.targets.Versus(t)).attributions,
        rtol=1e-9,
        atol=1e-12,
    )
    gr = GradRollout(model)
    assert not torch.allclose(
        gr(x, classes=t, target=bh.targets.Versus(s)).attributions,
        gr(x, classes=s, target=bh.targets.Versus(t)).attributions,
    )


def test_held_rules_run_the_modules_own_backward_only_when_off():
    """A held rule off when its module ran keeps the module's graph: off in the backward pass, autograd's own
    gradient (the module's node runs); on, the held gradient (w ⊙ g − mean(w ⊙ g))/σ, and the module's own
    node gets no gradient (it computes nothing). On from the start, the module's graph is not kept at all."""
    from backprop_hooks.rules import LayerNormHeld

    torch.manual_seed(0)
    ln = nn.LayerNorm(8).double()
    nn.init.normal_(ln.weight)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 8, dtype=torch.float64)
    plain = torch.autograd.grad(ln(x), x, g)[0]
    sigma = (x.detach().var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    wg = g * ln.weight.detach()
    want = (wg - wg.mean(-1, keepdim=True)) / sigma
    rule, ran = LayerNormHeld(enabled=False), []
    with bh.attach(ln, {"": rule}):
        y = ln(x)
        own = y.grad_fn.next_functions[1][0]  # the LayerNorm's own backward node
        own.register_prehook(lambda grads: ran.append(grads[0] is not None))  # None: called with nothing to do
        torch.testing.assert_close(torch.autograd.grad(y, x, g, retain_graph=True)[0], plain, rtol=0, atol=0)
        rule.enabled = True
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], want, rtol=1e-12, atol=1e-12)
        assert ran == [True, False]
        y = ln(x)  # on from the start: no path into the module's graph
        assert all(type(node).__name__ != type(own).__name__ for node, _ in y.grad_fn.next_functions if node)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], want, rtol=1e-12, atol=1e-12)


def test_transformer_attribution_switches_its_relevance_rules_back_off():
    model, x = small_vit(depth=2), inputs()
    method = TransformerAttribution(model)
    seen, release = {}, method.release

    def keep_then_release():  # the per-call state is dropped when the call returns: look at it just before
        seen.update(capture=method._capture, held=method._held)
        release()

    method.release = keep_then_release
    method(x)
    assert not seen["capture"].hold_attention and not any(r.enabled for r in seen["held"])
    testing.assert_no_hooks_left(model)


# -------------------------------------------------------------------------------------- vit_gradcam
def test_vit_gradcam_is_linear_and_passes_contrast_identities():
    model, x = small_vit(), inputs(2)
    method = ViTGradCAM(model, layer="blocks.1")
    assert method.linear
    testing.assert_contrast_identities(method, x, rtol=1e-8, atol=1e-12)


def test_vit_gradcam_equals_gradcam_on_tokens_written_out():
    model, x = small_vit(), inputs(2)
    e = ViTGradCAM(model, layer="blocks.1")(x, target="mean")
    found = []
    h = model.blocks[1].register_forward_hook(lambda m, i, o: found.append(o))
    y = model(x)
    h.remove()
    g = torch.autograd.grad(y, found[0], bh.targets.MeanContrast().seed(y.detach(), e.classes))[0]
    want = (g[:, 1:].mean(1, keepdim=True) * found[0][:, 1:]).sum(-1).reshape(2, 4, 4)
    torch.testing.assert_close(e.attributions, want.detach(), rtol=1e-10, atol=1e-12)


def test_linear_flags():
    model, x = small_vit(), inputs(1)
    for name in ROLLOUTS:
        assert bh.methods.get(name).linear is False
        assert bh.explain(model, x, method=name, target="weighted").linear is False
    assert bh.explain(model, x, method="vit_gradcam", target="weighted").linear is True
    assert bh.explain(model, x, method="vit_gradcam", relu=True).linear is False
    with pytest.warns(bh.errors.NonLinearContrastWarning):
        warnings.simplefilter("always")
        bh.explain(model, x, method="grad_rollout", target="weighted")


def test_vit_gradcam_default_layer_and_errors():
    model = small_vit()
    assert ViTGradCAM(model).layer == "blocks.2.norm1"
    assert ViTGradCAM(small_torchvision_vit()).layer == "encoder.layers.encoder_layer_1.ln_1"
    with pytest.raises(UnknownNameError):
        ViTGradCAM(model, layer="blocks.9")
    with pytest.raises(TokenLayoutError, match="tokens"):
        ViTGradCAM(model, layer="patch_embed.proj")(inputs(1))


# ------------------------------------------------------------------------------------------- models
def _check_all_methods(model, x, grid):
    before = testing.model_state(model)
    for name in ALL:
        e = bh.explain(model, x, method=name, target="weighted")
        assert e.attributions.shape == (x.shape[0], *grid), name
        assert e.maps.shape == (x.shape[0], *x.shape[-2:]), name
        assert torch.isfinite(e.attributions).all(), name
    testing.assert_no_hooks_left(model)
    testing.assert_same_state(model, before)


def test_register_tokens_and_non_square_grid():
    model = small_vit(img_size=(32, 48), reg_tokens=4)
    layout = bh.methods.token_layout(model, inputs(1, 32, 48))
    assert (layout.prefix, layout.grid, layout.readout) == (5, (4, 6), (0,))
    _check_all_methods(model, inputs(2, 32, 48), (4, 6))


def test_dynamic_image_size_grid_follows_the_input():
    model = small_vit(dynamic_img_size=True)
    x = inputs(2, 40, 32)
    assert bh.methods.token_layout(model, x).grid == (5, 4)
    assert Rollout(model)(x).attributions.shape == (2, 5, 4)


def test_rollout_with_registers_matches_reference():
    model, x = small_vit(reg_tokens=2), inputs()
    _, a_ref, _ = explicit_oracle(model, x)
    torch.testing.assert_close(Rollout(model)(x).attributions, reference_rollout(a_ref, prefix=3).reshape(3, 4, 4))


def test_average_pooled_head_reads_the_mean_of_patch_rows():
    model = small_vit(global_pool="avg", class_token=False)
    layout = bh.methods.token_layout(model, inputs(1))
    assert (layout.prefix, layout.readout) == (0, None)
    _check_all_methods(model, inputs(2), (4, 4))


def test_deit_with_distillation_token():
    model = small_deit_distilled()
    layout = bh.methods.token_layout(model, inputs(1))
    assert (layout.prefix, layout.readout) == (2, (0, 1))
    _check_all_methods(model, inputs(2), (4, 4))
    testing.assert_contrast_identities(ViTGradCAM(model, layer="blocks.0"), inputs(2), rtol=1e-8, atol=1e-12)


def test_torchvision_vit():
    model = small_torchvision_vit()
    _check_all_methods(model, inputs(2), (4, 4))
    testing.assert_batch_equals_single(GradRollout(model), inputs(3), rtol=1e-9, atol=1e-12)


def test_not_a_vit():
    cnn = testing.randomize(testing.CNN(3, 8, 4, 1, 3), 0)
    with pytest.raises(TokenLayoutError, match="prefix_tokens"):
        Rollout(cnn)(torch.randn(1, 3, 8, 8, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_little_patch16_reg4_gap_256"]
)
def test_timm_architectures_full_size(name):
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.rand(2, 3, size, size)
    _check_all_methods(model, x, (size // 16, size // 16))


@pytest.mark.slow
def test_torchvision_vit_b_16():
    model = torchvision.models.vit_b_16(weights=None, num_classes=10).eval()
    _check_all_methods(model, torch.rand(2, 3, 224, 224), (14, 14))


# ------------------------------------------------------------------- read-outs: values, not shapes
def reference_readout_rollout(mats, prefix, readout, discard_ratio=0.0):
    """Rollout of fused (B, N, N) layer matrices read out as the classifier reads the tokens: the mean of
    the ``readout`` rows, or of every patch row (``None``: average-pooled heads); patch columns only."""
    joint = None
    for a in mats:
        if discard_ratio:
            a = a.clone()
            n = a.shape[-1]
            k = int(discard_ratio * n * n)
            for b in range(a.shape[0]):
                magnitude = a[b].abs().flatten().clone()
                magnitude[:: n + 1] = float("inf")  # the diagonal is kept
                a[b].view(-1)[torch.argsort(magnitude, stable=True)[:k]] = 0.0
        a = (a + torch.eye(a.shape[-1], dtype=a.dtype)) / 2
        a = a / a.abs().sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    rows = list(range(prefix, joint.shape[1])) if readout is None else list(readout)
    return joint[:, rows, prefix:].mean(1)


def tokens_gradcam(model, x, layer_module, seed_of, prefix):
    """GradCAM on a block's tokens written out: patch-token gradients averaged over the grid weight the
    patch tokens' features."""
    found = []
    h = layer_module.register_forward_hook(lambda m, i, o: found.append(o))
    y = model(x)
    h.remove()
    g = torch.autograd.grad(y, found[0], seed_of(y.detach()))[0]
    return (g[:, prefix:].mean(1, keepdim=True) * found[0][:, prefix:]).sum(-1).detach()


def torchvision_attentions(model, x):
    """Per-head attention of each torchvision encoder layer, asked of nn.MultiheadAttention itself."""
    ref = copy.deepcopy(model)
    found = []
    for layer in ref.encoder.layers:
        mha = layer.self_attention

        def forward(q, k, v, need_weights=False, mha=mha, **kw):
            out, w = nn.MultiheadAttention.forward(mha, q, k, v, need_weights=True, average_attn_weights=False, **kw)
            found.append(w.detach())
            return out, None

        mha.forward = forward
    with torch.no_grad():
        y = ref(x)
    return y, found


@pytest.mark.parametrize(
    "kind, prefix, readout",
    [("avg_no_class_token", 0, None), ("avg_with_class_token", 1, None), ("deit_distilled", 2, (0, 1))],
)
def test_timm_read_outs_equal_references(kind, prefix, readout):
    """Average-pooled heads read the mean of the patch rows (class token excluded), the distilled DeiT the
    mean of its class and distillation rows: rollout and grad_rollout against references; vit_gradcam
    against GradCAM on the tokens written out (with the right prefix)."""
    if kind == "deit_distilled":
        model = small_deit_distilled()
    else:
        model = small_vit(global_pool="avg", class_token=kind == "avg_with_class_token")
    x = inputs()
    layout = bh.methods.token_layout(model, x)
    assert (layout.prefix, layout.readout) == (prefix, readout)
    y, a_ref, _ = explicit_oracle(model, x)
    got = Rollout(model)(x).attributions
    want = reference_readout_rollout([a.mean(1) for a in a_ref], prefix, readout).reshape(3, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    e = GradRollout(model)(x, target="weighted")

    def seed_fn(y):
        return bh.targets.Weighted().seed(y, e.classes)

    _, a_ref, g_ref = explicit_oracle(model, x, seed_fn)
    torch.testing.assert_close(e.logits, y, rtol=1e-12, atol=1e-12)
    mats = [(g * a).mean(1) for a, g in zip(a_ref, g_ref)]
    want = reference_readout_rollout(mats, prefix, readout).reshape(3, 4, 4)
    torch.testing.assert_close(e.attributions, want, rtol=1e-9, atol=1e-12)

    e = ViTGradCAM(model, layer="blocks.0")(x, target="max")
    want = tokens_gradcam(model, x, model.blocks[0], lambda y: bh.targets.MaxContrast().seed(y, e.classes), prefix)
    assert want.abs().amax() > 1e-3 and mats[0].abs().amax() > 1e-6  # not a vacuous 0 = 0
    torch.testing.assert_close(e.attributions, want.reshape(3, 4, 4), rtol=1e-10, atol=1e-12)


def test_torchvision_vit_read_outs_equal_references():
    """torchvision's ViT (nn.MultiheadAttention, class token first): rollout against the attention the
    module returns with need_weights=True, vit_gradcam against GradCAM on the tokens written out."""
    model, x = small_torchvision_vit(), inputs()
    y, attentions = torchvision_attentions(model, x)
    got = Rollout(model)(x)
    torch.testing.assert_close(got.logits, y, rtol=1e-12, atol=1e-12)
    want = reference_readout_rollout([a.mean(1) for a in attentions], 1, (0,)).reshape(3, 4, 4)
    torch.testing.assert_close(got.attributions, want, rtol=1e-10, atol=1e-12)
    block = model.encoder.layers.encoder_layer_0
    e = ViTGradCAM(model, layer="encoder.layers.encoder_layer_0")(x, target="weighted")
    want = tokens_gradcam(model, x, block, lambda y: bh.targets.Weighted().seed(y, e.classes), 1)
    assert want.abs().amax() > 1e-3  # not a vacuous 0 = 0
    torch.testing.assert_close(e.attributions, want.reshape(3, 4, 4), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.3, 0.9])
@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_discard_ratio_equals_reference(ratio, fusion):
    """discard_ratio zeroes int(ratio·N²) entries of smallest magnitude of each fused matrix, the diagonal
    kept, before the residual and the row normalisation."""
    model, x = small_vit(), inputs()
    _, a_ref, _ = explicit_oracle(model, x)
    fused = [{"mean": a.mean(1), "max": a.amax(1)}[fusion] for a in a_ref]
    got = Rollout(model, discard_ratio=ratio, head_fusion=fusion)(x).attributions
    want = reference_readout_rollout(fused, 1, (0,), discard_ratio=ratio).reshape(3, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, reference_readout_rollout(fused, 1, (0,)).reshape(3, 4, 4))
