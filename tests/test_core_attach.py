"""The hook registry: selectors, stacking, in-place ops, repeated modules, several inputs, cleanup."""

import pytest
import torch
from hypothesis import given
from torch import nn

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.errors import RuleError, SelectorError
from backprop_hooks.rules import Function, Identity


def plain_grad(model, x, seed):
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(model(x), x, seed)[0]


@given(testing.cases())
def test_identity_rule_everywhere_equals_plain_autograd(case):
    model, x = case.model, case.x
    seed = torch.randn(x.shape[0], model.num_classes, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    want = plain_grad(model, x, seed)
    before = testing.model_state(model)
    with bh.attach(model, {nn.Module: Identity()}) as handle:
        got = plain_grad(model, x, seed)
        assert len(handle.modules) == len(list(model.modules()))
    assert torch.equal(got, want)
    testing.assert_same_state(model, before)


@given(testing.cases())
def test_gradient_method_with_identity_rule_equals_autograd(case):
    """`gradient` with an identity rule on every module equals plain autograd, for every target."""
    model, x = case.model, case.x

    class WithIdentity(bh.methods.Gradient):
        def rules(self, x):
            return {nn.Module: Identity()}

    for target in ["logit", "weighted", "max"]:
        e = WithIdentity(model)(x, target=target)
        want = plain_grad(model, x, bh.targets.get(target).seed(e.logits, e.classes))
        assert torch.equal(e.attributions, want)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()


def test_selectors_type_glob_predicate_and_tuple():
    model = mlp()
    assert list(bh.attach(model, {nn.Linear: Identity()}).modules) == ["0", "2", "4"]
    assert list(bh.attach(model, {"[13]": Identity()}).modules) == ["1", "3"]
    assert list(bh.attach(model, {lambda n, m: n == "4": Identity()}).modules) == ["4"]
    assert list(bh.attach(model, {(nn.ReLU, nn.Sequential): Identity()}).modules) == ["", "1", "3"]
    assert list(bh.attach(model, [("0", Identity()), ("0", Identity())]).modules["0"]).__len__() == 2


def test_selector_errors_attach_nothing():
    model = mlp()
    with pytest.raises(SelectorError, match="matches no module.*names look like '0', '1'"):
        bh.attach(model, {nn.Linear: Identity(), "layer9": Identity()})
    testing.assert_no_hooks_left(model)
    with pytest.raises(SelectorError, match="neither a module type"):
        bh.attach(model, {3: Identity()})
    with pytest.raises(RuleError, match="expected a Rule"):
        bh.attach(model, {nn.Linear: "epsilon"})
    testing.assert_no_hooks_left(model)


def test_rule_check_refuses_module():
    class OnlyReLU(bh.Rule):
        def check(self, module):
            if not isinstance(module, nn.ReLU):
                raise RuleError(f"OnlyReLU cannot handle {type(module).__name__}")

    model = mlp()
    with pytest.raises(RuleError, match="cannot handle Sequential"):
        bh.attach(model, {nn.Module: OnlyReLU()})
    testing.assert_no_hooks_left(model)


def test_stacked_rules_run_in_the_order_given():
    model = mlp()
    x = torch.randn(2, 3, dtype=torch.float64)
    seed = torch.ones(2, 2, dtype=torch.float64)
    double = Function(lambda m, gi, go: tuple(2 * g for g in gi))
    shift = Function(lambda m, gi, go: tuple(g + 1 for g in gi))
    with bh.attach(model, {"0": [double, shift]}):
        a = plain_grad(model, x, seed)
    with bh.attach(model, {"0": [shift, double]}):
        b = plain_grad(model, x, seed)
    g = plain_grad(model, x, seed)
    torch.testing.assert_close(a, 2 * g + 1)
    torch.testing.assert_close(b, 2 * (g + 1))


class LinearFromGradOutput(bh.Rule):
    """Recomputes a Linear's input gradient from its own grad_output: wrong if calls were mispaired."""

    def forward(self, module, inputs, output):
        self.ctx.shape = output.shape

    def backward(self, module, grad_input, grad_output):
        assert grad_output[0].shape == self.ctx.shape
        return (grad_output[0] @ module.weight,)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.lin(x))
        h = self.act(self.lin(h)) + x
        return self.head(self.lin(h))


def test_module_used_several_times_pairs_each_call_with_its_own_grad_output():
    torch.manual_seed(1)
    model = Shared().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    seed = torch.randn(5, 3, dtype=torch.float64)
    want = plain_grad(model, x, seed)
    rule = LinearFromGradOutput()
    with bh.attach(model, {nn.Linear: rule, nn.ReLU: Identity()}):
        got = plain_grad(model, x, seed)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not (got == 0).all()


class Mul(nn.Module):
    def forward(self, a, flag, b):
        assert flag == "flag"
        return a * b


def test_module_with_several_inputs_and_non_tensor_arguments():
    mul = Mul()
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    seen = {}

    def swap(m, grad_input, grad_output):
        seen["len"], seen["none"] = len(grad_input), grad_input[1]
        torch.testing.assert_close(grad_input[0], grad_output[0] * b)
        return (grad_input[2], None, grad_input[0])

    with bh.attach(mul, {"": Function(swap)}):
        ga, gb = torch.autograd.grad(mul(a, "flag", b).sum(), [a, b])
    assert seen == {"len": 3, "none": None}
    torch.testing.assert_close(ga, a.detach())
    torch.testing.assert_close(gb, b.detach())


def test_inputs_that_do_not_require_grad_still_show_grad_output():
    model = mlp()
    x = torch.randn(2, 3, dtype=torch.float64)  # does not require grad
    seen = []
    with bh.attach(model, {"0": Function(lambda m, gi, go: seen.append((gi, go[0].shape)))}):
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    assert seen == [((None,), torch.Size([2, 4]))]


def test_rule_forward_may_replace_output_and_ctx_is_per_call():
    class Scale(bh.Rule):
        def forward(self, module, inputs, output):
            self.ctx.factor = inputs[0].shape[0]
            return output * 3

        def backward(self, module, grad_input, grad_output):
            return tuple(g * self.ctx.factor for g in grad_input)

    lin = nn.Linear(2, 2).double()
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    with bh.attach(lin, {"": Scale()}):
        y = lin(x)
        (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, 3 * lin(x))
    torch.testing.assert_close(g, 4 * 3 * lin.weight.sum(0).expand(4, 2))


def test_forward_only_rules_add_no_gates_and_parts_see_the_final_output():
    """``needs_backward=False``: no gradient gates around the module (its output is returned as the rule
    left it). ``parts``: helper rules on submodules, attached and removed with their owner, on hooks placed
    after all others, so a helper sees the output other rules' gates produced."""

    class Record(bh.Rule):
        needs_backward = False

        def __init__(self):
            self.seen = []

        def forward(self, module, inputs, output):
            self.seen.append(output)

    class Owner(bh.Rule):
        def __init__(self):
            self.helper = Record()

        def parts(self, module):
            return [(module[0], self.helper)]

    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    alone = Record()
    with bh.attach(net, {"2": alone}):
        y = net(x)
    assert y is alone.seen[0] and type(y.grad_fn).__name__ == "AddmmBackward0"  # not gated
    owner = Owner()
    with bh.attach(net, [("", owner), ("0", Identity())]) as handle:
        y = net(x)
        assert [type(r) for r in handle.modules["0"]] == [Identity, Record]
        assert type(owner.helper.seen[0].grad_fn).__name__ == "_GateBackward"  # Identity's gate came first
        torch.testing.assert_close(
            torch.autograd.grad(y.sum(), x)[0], plain_grad(net, x, torch.ones(4, 1, dtype=torch.float64))
        )
    testing.assert_no_hooks_left(net)


def test_wrong_backward_return_is_a_rule_error():
    lin = nn.Linear(2, 2)
    x = torch.randn(1, 2, requires_grad=True)
    with bh.attach(lin, {"": Function(lambda m, gi, go: (gi[0], gi[0]))}):
        with pytest.raises(RuleError, match="returned 2 gradient\\(s\\); it must return a tuple of 1"):
            lin(x).sum().backward()


def test_exception_inside_context_removes_hooks_and_keeps_user_hooks():
    model = mlp()
    calls = []
    user = model[0].register_forward_hook(lambda m, i, o: calls.append(1))
    before = testing.model_state(model)
    with pytest.raises(KeyError):
        with bh.attach(model, {nn.Module: Identity()}):
            model(torch.randn(1, 3, dtype=torch.float64))
            raise KeyError("boom")
    testing.assert_same_state(model, before)
    model(torch.randn(1, 3, dtype=torch.float64))
    assert calls == [1, 1]
    user.remove()


def test_handle_remove_is_idempotent_and_no_grad_forward_is_untouched():
    model = mlp()
    handle = bh.attach(model, {nn.Linear: Identity()})
    with torch.no_grad():
        y = model(torch.randn(2, 3, dtype=torch.float64))
    assert y.grad_fn is None
    handle.remove()
    handle.remove()
    testing.assert_no_hooks_left(model)
    assert "Handle" in repr(handle) and handle.linear


def test_removal_breaks_the_graph_rule_cycle_so_captures_are_freed():
    """The graph holds the gates, the rules hold graph tensors: removal must break that cycle (a leak before)."""
    import gc
    import weakref

    from backprop_hooks.rules import Capture

    model = mlp()
    capture = Capture()
    with bh.attach(model, {"2": capture, nn.ReLU: Identity()}):
        y = model(torch.randn(2, 3, dtype=torch.float64, requires_grad=True))
    ref = weakref.ref(capture.outputs[0])
    del capture, y
    gc.collect()
    assert ref() is None


def test_backward_after_removal_is_a_clear_error():
    model = mlp()
    with bh.attach(model, {nn.Linear: Identity()}):
        y = model(torch.randn(2, 3, dtype=torch.float64, requires_grad=True))
    with pytest.raises(RuleError, match="after its rules were removed"):
        y.sum().backward()
