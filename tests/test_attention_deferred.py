"""The deferred attention capture: F.scaled_dot_product_attention runs its own kernel in the forward, and the
capture's node computes A, ∂f/∂A and the attention's gradients in the backward. Oracle: autograd through the
attention written out (sdpa_explicit), for every mask kind, grouped-query heads and both hold modes."""

import pytest
import torch
import torch.nn.functional as F

from backprop_hooks.rules import attention_nodes
from backprop_hooks.rules.attention import AttentionCapture
from backprop_hooks.rules.attention_maths import repeat_heads, sdpa_explicit

B, H, L, D = 2, 4, 6, 5


def _tensors(kv_heads: int = H):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    seed = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    return q, k, v, seed


def _cases():
    g = torch.Generator().manual_seed(1)
    boolean = torch.rand(B, 1, L, L, generator=g) > 0.4
    boolean[..., 0] = True
    empty_row = boolean.clone()
    empty_row[0, 0, 2] = False  # a query with no key left: uniform weights, no gradient to its scores
    additive = torch.randn(B, H, L, L, generator=g, dtype=torch.float64)
    padding = torch.zeros(B, 1, 1, L, dtype=torch.float64)
    padding[1, ..., -2:] = torch.finfo(torch.float64).min  # Hugging Face's additive padding mask
    return {
        "none": dict(),
        "causal": dict(is_causal=True),
        "boolean": dict(attn_mask=boolean),
        "boolean, empty row": dict(attn_mask=empty_row),
        "additive": dict(attn_mask=additive),
        "padding": dict(attn_mask=padding),
        "scale": dict(scale=0.3),
        "gqa": dict(enable_gqa=True),
        "gqa, causal": dict(enable_gqa=True, is_causal=True),
    }


CASES = _cases()


def _oracle(q, k, v, seed, kw: dict, hold: bool):
    """(A, ∂f/∂A, [∂f/∂q, ∂f/∂k, ∂f/∂v]) by autograd through the explicit attention (A detached when held)."""
    leaf = {}

    def wrap(attn):
        leaf["a"] = attn.detach().requires_grad_(True)
        return leaf["a"] if hold else attn + (leaf["a"] - leaf["a"].detach())

    out, attn = sdpa_explicit(q, k, v, wrap=wrap, **kw)
    grads = torch.autograd.grad(out, [leaf["a"], q, k, v], seed, allow_unused=True)
    return attn.detach(), grads[0], [torch.zeros_like(t) if d is None else d for t, d in zip((q, k, v), grads[1:])]


@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_deferred_attention_equals_the_explicit_path(case, hold):
    kw = CASES[case]
    q, k, v, seed = _tensors(kv_heads=2 if kw.get("enable_gqa") else H)
    plain = F.scaled_dot_product_attention(q, k, v, **kw)
    capture = AttentionCapture(hold_attention=hold)
    with capture.recording():
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.equal(out, plain)  # the kernel's own numbers
    assert capture.attentions == [None] and capture.shapes == [torch.Size((B, H, L, L))]
    a_ref, g_ref, grads_ref = _oracle(q, k, v, seed, kw, hold)
    for _ in range(2):  # two backward passes over one graph
        [(a, g)] = capture.gradients(out, seed, retain_graph=True)
        torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-14)
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)
        grads = torch.autograd.grad(out, [q, k, v], seed, retain_graph=True, allow_unused=True)
        for got, want in zip(grads, grads_ref):
            got = torch.zeros_like(want) if got is None else got  # held: no gradient reaches q and k
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_hold_switched_between_two_passes_over_one_graph():
    """transformer_attribution's order: a plain pass (retaining the graph), then a held one, each equal to its
    oracle, then a plain one again (the scores' gradient is recomputed, not read from the held pass)."""
    q, k, v, seed = _tensors(kv_heads=2)
    kw = dict(enable_gqa=True, is_causal=True)
    capture = AttentionCapture()
    with capture.recording():
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    for hold in (False, True, False):
        capture.hold_attention = hold
        grads = torch.autograd.grad(out, [q, k, v], seed, retain_graph=True, allow_unused=True)
        for got, want in zip(grads, _oracle(q, k, v, seed, kw, hold)[2]):
            got = torch.zeros_like(want) if got is None else got
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_attention_is_computed_once_per_call_in_the_backward(monkeypatch):
    """No A in the forward; one A per call and backward pass, also in a second (held) pass over the retained
    graph, and the same A in each."""
    calls = []
    original = attention_nodes.sdpa_probabilities

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_nodes, "sdpa_probabilities", counted)
    q, k, v, seed = _tensors()
    capture = AttentionCapture()
    with capture.recording():
        h = F.scaled_dot_product_attention(q, k, v)
        out = F.scaled_dot_product_attention(h, k, v, is_causal=True)
    assert len(calls) == 0 and capture.attentions == [None, None]
    first = capture.gradients(out, seed, retain_graph=True)
    assert len(calls) == 2
    capture.hold_attention = True
    held = capture.gradients(out, seed, retain_graph=True)
    assert len(calls) == 4
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, held))
    capture.hold_attention = False
    capture.gradients(out, seed)
    assert len(calls) == 6


def test_reduce_receives_each_call_once_with_its_index():
    """gradients(reduce=...): one reduce per call and pass, its index the call's place in forward order, the
    deferred and the explicit (softmax) calls alike; results in forward order."""
    q, k, v, seed = _tensors()
    capture = AttentionCapture()
    with capture.recording():
        h = F.scaled_dot_product_attention(q, k, v)
        a = torch.softmax(h @ k.transpose(-2, -1), dim=-1)  # an explicit attention call in between
        out = F.scaled_dot_product_attention(a @ v, k, v)
    seen = []
    results = capture.gradients(out, seed, reduce=lambda i, attn, g: seen.append(i) or (i, attn.shape))
    assert sorted(seen) == [0, 1, 2] and [r[0] for r in results] == [0, 1, 2]
    assert capture.attentions[0] is None and capture.attentions[1] is not None and capture.attentions[2] is None


def test_an_unasked_backward_keeps_nothing():
    """A backward that is not a gradients() call (a user's own .backward()) runs the nodes' gradients and
    hands nothing over; a later gradients() call over a retained graph still gets every pair."""
    q, k, v, seed = _tensors()
    capture = AttentionCapture()
    with capture.recording():
        out = F.scaled_dot_product_attention(q, k, v)
    out.backward(seed, retain_graph=True)
    assert not capture._handoff.results and capture._handoff.reduce is None
    want = _oracle(*(t.detach().requires_grad_() for t in (q, k, v)), seed, {}, False)
    torch.testing.assert_close(q.grad, want[2][0], rtol=1e-10, atol=1e-13)
    [(a, g)] = capture.gradients(out, seed)
    torch.testing.assert_close(g, want[1], rtol=1e-12, atol=1e-14)


def test_repeat_heads_and_its_adjoint():
    t = torch.arange(2 * 2 * 3 * 1.0).view(2, 2, 3, 1)
    r = repeat_heads(t, 4)
    assert torch.equal(r[:, 0], t[:, 0]) and torch.equal(r[:, 1], t[:, 0]) and torch.equal(r[:, 2], t[:, 1])
    assert torch.equal(attention_nodes.fold_heads(r, t), 2 * t)


def test_no_attention_map_is_held_from_the_forward_to_the_backward():
    """Deterministic allocator counts on a small timm ViT: the capture's forward holds no more than a plain
    forward with gradients (0.99x; 1.48x when every layer's A was computed in the forward), and grad_rollout,
    which reduces each layer's pair as it arrives, stays near a plain forward+backward (1.21x; 1.52x)."""
    import timm

    import backprop_hooks as bh
    from bench.memory import peak_mib
    from bench.timing import capture_forward, forward, forward_backward

    torch.manual_seed(0)
    opts = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    model = timm.models.VisionTransformer(**opts).eval()
    x, t, cpu = torch.rand(4, 3, 64, 64), torch.zeros(4, dtype=torch.long), torch.device("cpu")
    assert peak_mib(capture_forward(model, x), cpu) <= peak_mib(forward(model, x), cpu)
    method = bh.methods.get("grad_rollout")(model)
    assert peak_mib(lambda: method(x, classes=t, target="logit"), cpu) < 1.35 * peak_mib(
        forward_backward(model, x, t), cpu
    )


def test_the_capture_pass_computes_only_the_gradients_it_uses(monkeypatch):
    """In the capture's own pass (its inputs: the probes) a deferred node skips the gradients that reach no
    probe: the first call's q, k, v, and leaves. A user's torch.autograd.grad gets all it asks for."""
    seen = []
    original = attention_nodes._wanted

    def recorded(ctx):
        seen.append(original(ctx)[:4])
        return seen[-1]

    monkeypatch.setattr(attention_nodes, "_wanted", recorded)
    q, k, v, seed = _tensors()
    capture = AttentionCapture()
    with capture.recording():
        h = F.scaled_dot_product_attention(q, k, v)
        out = F.scaled_dot_product_attention(h, k, v)
    capture.gradients(out, seed, retain_graph=True)
    assert seen == [(True, True, False, False), (True, False, False, False)]  # backward order: last call first
    seen.clear()
    grads = torch.autograd.grad(out, [q, k, v], seed, retain_graph=True)
    assert seen == [(True, True, True, True)] * 2
    seen.clear()
    torch.autograd.grad(out, [v], seed)
    assert seen == [(True, True, False, True), (True, False, False, True)]
    want = torch.autograd.grad(sdpa_explicit(sdpa_explicit(q, k, v)[0], k, v)[0], [q, k, v], seed)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-13)


def test_multihead_keeps_its_attention_for_a_held_pass_only_while_the_graph_is_kept(monkeypatch):
    """nn.MultiheadAttention (transformer_attribution's order): A once in a plain pass that retains the graph;
    a held pass over it reuses that A and recomputes the value projection alone."""
    import backprop_hooks as bh

    counts = {"probabilities": 0, "values": 0}
    for name, key in (("_mha_probabilities", "probabilities"), ("_mha_values", "values")):
        original = getattr(attention_nodes, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(attention_nodes, name, counted)
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 8, dtype=torch.float64)
    capture = AttentionCapture()
    with bh.attach(mha, {"": capture}):
        out = mha(x, x, x, need_weights=False)[0]
    [(a, plain)] = capture.gradients(out, g, retain_graph=True)
    assert counts == {"probabilities": 1, "values": 0}
    capture.hold_attention = True
    [(a_held, held)] = capture.gradients(out, g)
    assert counts == {"probabilities": 1, "values": 1}
    assert torch.equal(a, a_held)
    torch.testing.assert_close(held, plain, rtol=1e-12, atol=1e-14)  # one layer: the same ∂f/∂A in both modes
