"""attnlrp on small transformers built here: equal to AttnLRP written out as relevance redistribution
(tests/_attnlrp_oracle.py, no code shared with the rules); conservation where AttnLRP's rules conserve and
the softmax's leak where they do not; linear in the seed (every contrast identity), a batch equal to each
sample alone; the composite edited (CP-LRP, ε, γ); products whose factor does not depend on the input;
nothing left on the model after a call or an exception; compiled models run eagerly with the warning."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import backprop_hooks as bh
from backprop_hooks import errors, rules, testing
from backprop_hooks.rules.attnlrp import AttnLRPComposite

from _attnlrp_oracle import attnlrp_oracle, tiny

KINDS = st.sampled_from(["vit", "llama"])


@st.composite
def tiny_cases(draw, scores="softmax", biases=True, masks=True):
    """A random Tiny transformer (style, attention path, width, heads, length) and an input batch."""
    style, explicit = draw(KINDS), draw(st.booleans())
    heads = draw(st.sampled_from([1, 2]))
    d, n, b = heads * draw(st.integers(2, 4)), draw(st.integers(2, 5)), draw(st.integers(1, 3))
    model = tiny(
        draw(st.integers(0, 2**31 - 1)), biases, d=d, heads=heads, length=n, style=style, explicit=explicit,
        scores=scores, classes=draw(st.integers(2, 4)),
    )  # fmt: skip
    if masks and style == "vit" and draw(st.booleans()):
        lengths = torch.tensor(draw(st.lists(st.integers(1, n), min_size=b, max_size=b)))
        model.key_mask = torch.arange(n)[None] < lengths[:, None]
    x = torch.randn(b, n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    return model, x


def objective(e):
    """``seed · y`` per sample for the explanation's own target (logit here): ``y_t``."""
    return e.logits.gather(1, e.classes[:, None])[:, 0]


# ----------------------------------------------------------------------------------------- the oracle
@settings(max_examples=testing.examples(12))
@given(tiny_cases(), st.sampled_from(["logit", "weighted", "max"]))
def test_equals_attnlrp_written_out(case, target):
    model, x = case
    e = bh.explain(model, x, "attnlrp", target)
    seed = testing.contrast_weights(e.logits, e.classes, target)
    want = attnlrp_oracle(model, x, seed)
    torch.testing.assert_close(e.attributions, want, rtol=1e-8, atol=1e-10 * float(want.abs().max()))
    assert e.linear and e.method == "attnlrp"


def test_the_oracle_sees_a_wrong_rule():
    """The oracle comparison fails when one rule is wrong: the plain gradient through the products (no uniform
    rule), the softmax held (CP-LRP), no identity rule on the norms."""
    model = tiny(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for wrong in (dict(product="gradient"), dict(softmax="held"), dict(norm=False)):
        e = bh.explain(model, x, "attnlrp", "logit", **wrong)
        want = attnlrp_oracle(model, x, testing.contrast_weights(e.logits, e.classes, "logit"))
        assert (e.attributions - want).abs().max() > 1e-4 * want.abs().max(), wrong


# ------------------------------------------------------------------------------------- conservation
@settings(max_examples=testing.examples(12))
@given(tiny_cases(scores="linear", biases=False), st.sampled_from(["attnlrp", "cp_lrp"]))
def test_conservative_rules_conserve_with_zero_biases(case, composite):
    """Linear layers, LayerNorm/RMSNorm, GELU/SiLU and the products (q kᵀ, A v, the gated MLP) with every bias
    zero: the input relevance sums to the explained objective ``y_t`` (no softmax in these models)."""
    model, x = case
    e = bh.explain(model, x, "attnlrp", "logit", composite=composite)
    total, y_t = e.attributions.sum(dim=(1, 2)), objective(e)
    torch.testing.assert_close(total, y_t, rtol=1e-4, atol=1e-12 + 1e-9 * float(e.attributions.abs().sum()))


@settings(max_examples=testing.examples(6))
@given(tiny_cases(biases=False, masks=False))
def test_cp_lrp_conserves_through_the_softmax_and_attnlrp_leaks(case):
    """CP-LRP holds the attention probabilities: conservative with zero biases. AttnLRP's softmax rule (deep
    Taylor with its bias term) is not: the same models leak (measured on real-size models in the README)."""
    model, x = case
    held = bh.explain(model, x, "attnlrp", "logit", composite="cp_lrp")
    torch.testing.assert_close(held.attributions.sum(dim=(1, 2)), objective(held), rtol=1e-4, atol=1e-10)


def test_attnlrp_softmax_leaks():
    model = tiny(1, biases=False)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    e = bh.explain(model, x, "attnlrp", "logit")
    leak = (e.attributions.sum(dim=(1, 2)) - objective(e)).abs() / objective(e).abs()
    assert float(leak.max()) > 1e-3


# ------------------------------------------------------------------------------- linear in the seed
@settings(max_examples=testing.examples(5))
@given(tiny_cases(), st.sampled_from(["attnlrp", "cp_lrp"]))
def test_contrast_identities(case, composite):
    model, x = case
    testing.assert_contrast_identities(bh.methods.AttnLRP(model, composite=composite), x, rtol=1e-8)


@settings(max_examples=testing.examples(8))
@given(tiny_cases(masks=False))
def test_batch_equals_each_sample_alone(case):
    model, x = case
    testing.assert_batch_equals_single(bh.methods.AttnLRP(model), x, rtol=1e-8)


@settings(max_examples=testing.examples(6))
@given(testing.cases())
def test_on_cnns_and_mlps_it_is_input_x_gradient_with_identity_rules(case):
    """Networks without products or norms: ReLU keeps its gradient (already the identity rule); GELU gets the
    identity rule. With ReLU only, attnlrp is input × gradient."""
    got = bh.explain(case.model, case.x, "attnlrp", "weighted")
    if case.model.act_name != "gelu":
        want = bh.explain(case.model, case.x, "input_x_gradient", "weighted")
        torch.testing.assert_close(got.attributions, want.attributions, rtol=1e-9, atol=1e-12)
    testing.assert_contrast_identities(bh.methods.AttnLRP(case.model), case.x)


# ------------------------------------------------------------------------------------- the composite
def test_composite_options_and_instances():
    model = tiny(2)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cp = bh.explain(model, x, "attnlrp", "weighted", composite="cp_lrp").attributions
    edited = bh.explain(model, x, "attnlrp", "weighted", composite=AttnLRPComposite(softmax="held")).attributions
    assert torch.equal(cp, edited)
    assert torch.equal(cp, bh.explain(model, x, "attnlrp", "weighted", softmax="held").attributions)
    default = bh.explain(model, x, "attnlrp", "weighted").attributions
    assert not torch.allclose(cp, default)
    gamma = bh.explain(model, x, "attnlrp", "weighted", linear=lambda: rules.Gamma(0.25)).attributions
    assert torch.isfinite(gamma).all() and not torch.allclose(gamma, default)
    with pytest.raises(errors.OptionError, match="softmax"):
        bh.explain(model, x, "attnlrp", softmax="hold")
    with pytest.raises(errors.UnknownNameError, match="AttnLRP composite 'nope'.*'attnlrp', 'cp_lrp'"):
        bh.explain(model, x, "attnlrp", composite="nope")
    with pytest.raises(errors.OptionError, match="instance"):
        bh.explain(model, x, "attnlrp", composite=AttnLRPComposite(), epsilon=0.1)


def test_epsilon_rule_on_linear_layers():
    """ε > 0 on a Linear layer: ``R_x = x ⊙ Wᵀ(R_y / (y + ε·sign y))``, ``R_y = y ⊙ seed``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    e = bh.explain(model, x, "attnlrp", "weighted", epsilon=0.5)
    y = e.logits
    seed = testing.contrast_weights(y, e.classes, "weighted")
    stab = y + 0.5 * torch.where(y >= 0, 1.0, -1.0)
    torch.testing.assert_close(e.attributions, x * ((y * seed / stab) @ model[0].weight.detach()))


def test_a_factor_that_does_not_depend_on_the_input_keeps_the_whole_gradient():
    """Products with a parameter, a parameter-derived tensor or a constant are linear maps of the input: no
    split. Learned keys (cross-attention to latents): only A v is a product of two input-dependent factors."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.lin = nn.Parameter(torch.randn(4, dtype=torch.float64)), nn.Linear(4, 3).double()
            self.keys = nn.Parameter(torch.randn(1, 1, 5, 4, dtype=torch.float64))

        def forward(self, x):
            h = self.lin.weight.new_ones(4) * x * (1 + self.w)  # factors: a constant, x, a parameter-derived tensor
            q = h[:, None, None, :]
            explicit = (q @ self.keys.transpose(-2, -1)).softmax(-1) @ self.keys
            fused = nn.functional.scaled_dot_product_attention(q, self.keys, self.keys)
            return self.lin(h + explicit[:, 0, 0] + fused[:, 0, 0])

    model = Scaled().eval()
    x = torch.randn(2, 4, dtype=torch.float64)
    got = bh.explain(model, x, "attnlrp", "weighted").attributions
    want = bh.explain(model, x, "input_x_gradient", "weighted").attributions
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_in_place_product_of_two_input_dependent_tensors_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4).double(), nn.Linear(4, 2).double()

        def forward(self, x):
            h = self.a(x)
            h *= x
            return self.b(h)

    model = InPlace().eval()
    before = testing.model_state(model)
    with pytest.raises(errors.RuleError, match="in-place product"):
        bh.explain(model, torch.randn(2, 4, dtype=torch.float64), "attnlrp")
    testing.assert_same_state(model, before)
    assert torch._C._len_torch_function_stack() == 0


# ------------------------------------------------------------------------------------------ lifecycle
class Boom(Exception):
    pass


def test_nothing_is_left_after_a_call_or_an_exception():
    model = tiny(3, style="llama", explicit=True)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    before = testing.model_state(model)
    bh.explain(model, x, "attnlrp", "weighted")
    testing.assert_same_state(model, before)
    assert torch._C._len_torch_function_stack() == 0

    def boom(module, inputs, output):
        raise Boom("the model's own failure")

    handle = model.blocks[1].act.register_forward_hook(boom)  # fails inside the explained forward pass
    try:
        with pytest.raises(errors.ForwardError, match="Boom"):
            bh.explain(model, x, "attnlrp", "weighted")
    finally:
        handle.remove()
    assert torch._C._len_torch_function_stack() == 0

    class Raising(bh.Rule):
        def forward(self, module, inputs, output):
            raise Boom("a rule's failure")

    with pytest.raises(Boom):
        bh.explain(model, x, "attnlrp", "weighted", linear=Raising)
    testing.assert_same_state(model, before)
    assert torch._C._len_torch_function_stack() == 0
    fresh = tiny(3, style="llama", explicit=True)  # the next call is as the first
    want = bh.explain(fresh, x, "attnlrp", "weighted").attributions
    torch.testing.assert_close(bh.explain(model, x, "attnlrp", "weighted").attributions, want)


def test_compiled_models_run_eagerly_with_the_warning():
    """Also a model with no module rule at all (an MLP with ReLUs): the products are function-level rules."""
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mlp = testing.randomize(testing.MLP(4, 5, 1, 3), 0)
    torch._dynamo.reset()
    for eager, inputs in ((tiny(4), x), (mlp, x[:, 0, :4])):
        want = bh.explain(eager, inputs, "attnlrp", "weighted").attributions
        model = torch.compile(eager, backend="eager")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = bh.explain(model, inputs, "attnlrp", "weighted")
            bh.explain(model, inputs, "attnlrp", "weighted")
        said = [w for w in seen if issubclass(w.category, errors.CompiledModelWarning)]
        assert len(said) == 1 and "attnlrp on a compiled" in str(said[0].message)
        torch.testing.assert_close(got.attributions, want, rtol=1e-12, atol=1e-14)
        testing.assert_no_hooks_left(model)


def test_identity_rule_on_tanh_conserves():
    """A tanh (BERT's pooler) gets the identity rule: a bias-free Linear-tanh-Linear conserves exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    x[0, :] = 0.0  # x = 0: the limit of tanh(x)/x, 1
    e = bh.explain(model, x, "attnlrp", "logit")
    torch.testing.assert_close(e.attributions.sum(1), objective(e), rtol=1e-10, atol=1e-14)
    plain = bh.explain(model, x, "attnlrp", "logit", activation=False)
    assert not torch.allclose(plain.attributions.sum(1), objective(plain))


def test_function_rules_stand_aside_inside_modules_a_rule_owns(monkeypatch):
    """An RMSNorm's ``x * rsqrt(mean(x²) + ε)`` is a product of two input-dependent tensors: with the norm rule
    on, the product rule leaves it alone (the norm rule owns the module's backward); with ``norm=False`` it acts."""
    from backprop_hooks.rules import products

    scaled = []
    original = products.scale_gradient
    monkeypatch.setattr(products, "scale_gradient", lambda t, f: scaled.append(f) or original(t, f))

    class Norm(nn.Module):  # Hugging Face's Llama RMSNorm, written out
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.rand(4, dtype=torch.float64) + 0.5), 1e-6

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    class LlamaRMSNorm(Norm):
        pass

    model = nn.Sequential(nn.Linear(4, 4), LlamaRMSNorm(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    owned = bh.explain(model, x, "attnlrp", "weighted")
    assert scaled == []
    torch_norm = nn.RMSNorm(4, eps=1e-6).double()  # the same norm as torch's module: the same rule, the same answer
    torch_norm.weight.data.copy_(model[1].weight.data)
    same = bh.explain(nn.Sequential(model[0], torch_norm, model[2]).eval(), x, "attnlrp", "weighted")
    torch.testing.assert_close(owned.attributions, same.attributions, rtol=1e-12, atol=1e-14)
    bh.explain(model, x, "attnlrp", "weighted", norm=False)
    assert scaled == [0.5, 0.5]


def test_every_spelling_of_a_product_gets_the_uniform_rule():
    """``a @ b``, ``torch.matmul``, ``bmm``, ``baddbmm`` (bias + a b), ``einsum`` and ``a * b``: the same relevance."""
    spellings = {
        "matmul": lambda q, k: q @ k.transpose(-2, -1),
        "bmm": lambda q, k: torch.bmm(q, k.transpose(-2, -1)),
        "baddbmm": lambda q, k: torch.baddbmm(torch.zeros(1, 1, 1, dtype=q.dtype), q, k.transpose(-2, -1)),
        "einsum": lambda q, k: torch.einsum("bid,bjd->bij", q, k),
        "mul": lambda q, k: (q[:, :, None, :] * k[:, None, :, :]).sum(-1),
    }

    class Bilinear(nn.Module):
        def __init__(self, product):
            super().__init__()
            self.product = product
            torch.manual_seed(0)
            self.q, self.k, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(9, 3)

        def forward(self, x):
            return self.head(self.product(self.q(x), self.k(x)).flatten(1))

    x = torch.randn(2, 3, 4, dtype=torch.float64)
    results = {name: bh.explain(Bilinear(f).double().eval(), x, "attnlrp", "weighted") for name, f in spellings.items()}
    for name, e in results.items():
        torch.testing.assert_close(e.attributions, results["matmul"].attributions, rtol=1e-10, atol=1e-13, msg=name)
    plain = bh.explain(Bilinear(spellings["matmul"]).double().eval(), x, "input_x_gradient", "weighted")
    torch.testing.assert_close(results["matmul"].attributions, plain.attributions / 2)  # bias-free q, k: exactly half
