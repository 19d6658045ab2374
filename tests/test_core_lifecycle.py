"""Lifecycle: rule sets attached and removed, explanations run and exceptions raised at random points;
afterwards no hook is left and the model is bit-identical (values, grads, requires_grad, training, hooks)."""

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

import backprop_hooks as bh
from backprop_hooks import testing
from backprop_hooks.rules import Capture, Function, Identity


class Boom(Exception):
    pass


def raising_rule(where: str) -> bh.Rule:
    class Raise(bh.Rule):
        def forward(self, module, inputs, output):
            if where == "forward":
                raise Boom("forward")

        def backward(self, module, grad_input, grad_output):
            if where == "backward":
                raise Boom("backward")

    return Raise()


SELECTORS = [nn.Linear, nn.Conv2d, nn.ReLU, "blocks.*", "head", lambda n, m: n.endswith("0")]


class Lifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        net = testing.randomize(
            testing.CNN(2, 6, 3, 2, 4, act="relu_inplace", batchnorm=True, residual=True), seed=5, dtype=torch.float32
        )
        net.head.weight.grad = torch.ones_like(net.head.weight)  # a user's existing grad must survive
        net.blocks[0][0].weight.requires_grad_(False)  # a user's frozen parameter must stay frozen
        net.stem.register_forward_hook(lambda m, i, o: None)  # a user's hook must stay
        self.model = net
        self.before = testing.model_state(net)
        self.handles = []
        self.x = torch.randn(3, 2, 6, 6)

    @rule(selector=st.sampled_from(SELECTORS), kind=st.sampled_from(["identity", "capture", "scale"]))
    def attach(self, selector, kind):
        chosen = {
            "identity": Identity(),
            "capture": Capture(),
            "scale": Function(lambda m, gi, go: tuple(None if g is None else 2 * g for g in gi)),
        }[kind]
        self.handles.append(bh.attach(self.model, {selector: chosen}))

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 10))
    def remove(self, index):
        self.handles.pop(index % len(self.handles)).remove()

    @rule(
        method=st.sampled_from(["gradient", "input_x_gradient", "smoothgrad", "integrated_gradients"]),
        objective=st.sampled_from(["logit", "weighted", "max"]),
    )
    def explain(self, method, objective):
        options = {"smoothgrad": {"n_samples": 2}, "integrated_gradients": {"n_steps": 2}}.get(method, {})
        e = bh.explain(self.model, self.x, method, objective, **options)
        assert torch.isfinite(e.attributions).all()

    @rule(where=st.sampled_from(["forward", "backward", "body"]), selector=st.sampled_from(SELECTORS))
    def explain_and_fail(self, where, selector):
        try:
            with bh.attach(self.model, {selector: raising_rule(where)}):
                bh.explain(self.model, self.x, "gradient", "weighted")
                raise Boom("body")
        except Boom:
            pass

    @rule()
    def fail_inside_method(self):
        class Failing(bh.methods.Gradient):
            def rules(self, x):
                return {nn.ReLU: raising_rule("backward")}

        try:
            Failing(self.model)(self.x, target="mean")
        except Boom:
            pass

    @invariant()
    def clean_when_nothing_is_attached(self):
        testing.assert_handles_leave_no_trace(self.model, self.before, self.handles, remove=False)

    def teardown(self):
        testing.assert_handles_leave_no_trace(self.model, self.before, self.handles, remove=True)


Lifecycle.TestCase.settings = __import__("hypothesis").settings(
    max_examples=testing.examples(15), stateful_step_count=12, deadline=None
)
TestLifecycle = Lifecycle.TestCase
