"""No untyped errors from misuse, and no trace on the model, whatever the user does.

* ``test_public_api_result_or_typed_error``: random methods × targets × classes (valid and not) × input dtypes,
  shapes and memory formats × grad modes × random networks of ``backprop_hooks.testing``, compiled or not:
  ``bh.explain`` returns an explanation or raises a ``BackpropHooksError``; the model's parameters, buffers,
  ``.grad``, ``requires_grad``, training flags and hooks are as before.
* ``HookLifecycle``: a hypothesis state machine runs random sequences of attach / forward / backward /
  remove / explain, with rules that raise in forward or backward, and checks that once every handle is
  removed the model is exactly as it started.
"""

import warnings

import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from torch import nn

import backprop_hooks as bh
from backprop_hooks import errors, testing
from backprop_hooks.rule import Identity, Rule
from backprop_hooks.rules.capture import Capture
from backprop_hooks.rules.lrp import Epsilon
from backprop_hooks.rules.relu import GuidedReLU

TARGET_NAMES = ["logit", "softmax", "log_softmax", "weighted", "mean", "max", "versus:1", "bogus", "versus:99"]
OPTIONS = {"smoothgrad": {"n_samples": 2, "seed": 0}, "integrated_gradients": {"n_steps": 2}}


def mostly(valid, invalid, weight: int = 8):
    """``valid`` about ``weight`` times as often as ``invalid``: most examples reach a result."""
    return st.sampled_from(range(weight + 1)).flatmap(lambda i: invalid if i == weight else valid)


@st.composite
def classes_for(draw, batch: int, num_classes: int):
    valid = st.one_of(
        st.none(),
        st.integers(0, num_classes - 1),
        st.lists(st.integers(0, num_classes - 1), min_size=batch, max_size=batch),
        st.lists(st.integers(0, num_classes - 1), min_size=batch, max_size=batch).map(torch.tensor),
    )
    invalid = st.one_of(
        st.sampled_from([-1, num_classes, num_classes + 5, True, "cat", 1.5]),
        st.lists(st.integers(-1, num_classes), min_size=1, max_size=batch + 2),
        st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=batch + 2).map(torch.tensor),
        st.just(torch.zeros(batch)),  # float classes
        st.just(torch.zeros(batch, dtype=torch.bool)),
    )
    return draw(mostly(valid, invalid, 4))


@st.composite
def inputs_for(draw, model: nn.Module):
    shape = model.input_shape
    batch = draw(st.integers(1, 3))
    kind = draw(mostly(st.just("ok"), st.sampled_from(["no_batch", "wrong_features", "empty_batch", "extra_dim"])))
    if kind == "no_batch":
        dims = shape
    elif kind == "wrong_features":
        dims = (batch, shape[0] + 1, *shape[1:])
    elif kind == "empty_batch":
        dims = (0, *shape)
    elif kind == "extra_dim":
        dims = (batch, 1, *shape)
    else:
        dims = (batch, *shape)
    x = torch.randn(dims, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))), dtype=torch.float64)
    dtype = draw(
        mostly(st.just(torch.float64), st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]))
    )
    x = x.to(dtype)
    layout = draw(mostly(st.sampled_from(["contiguous", "channels_last", "strided"]), st.just("nan")))
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided" and x.dim() >= 2:
        x = torch.cat([x, x], dim=-1)[..., ::2]  # non-contiguous, same values
    elif layout == "nan" and x.is_floating_point() and x.numel():
        x = x.clone()
        x.view(-1)[0] = float("nan")
    return x


@st.composite
def options_for(draw, name: str, model: nn.Module):
    options = dict(OPTIONS.get(name, {}))
    cls = bh.methods.get(name) if name in bh.methods.available() else None
    if cls is not None and cls.takes_layer:
        names = [n for n, _ in model.named_modules() if n]
        layer = draw(mostly(st.one_of(st.none(), st.sampled_from(names)), st.sampled_from(["nope", 3]), 4))
        if layer is not None:
            options["layer"] = layer
    return options


def grad_mode(name: str):
    return {"none": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[name]()


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_public_api_result_or_typed_error(data):
    model = data.draw(testing.networks(), label="model")
    compiled = data.draw(st.sampled_from([False, False, True]), label="compiled")
    runner = model
    if compiled:
        torch._dynamo.reset()
        runner = torch.compile(model, backend="eager", dynamic=False)
    cnn = [m for m in bh.methods.available() if bh.methods.get(m).space != "tokens"]
    tokens = [m for m in bh.methods.available() if m not in cnn]
    name = data.draw(mostly(st.sampled_from(cnn), st.sampled_from(tokens + ["nope"])), label="method")
    valid_target = st.one_of(st.sampled_from(TARGET_NAMES[:7]), st.integers(0, 1).map(bh.targets.Versus))
    invalid_target = st.one_of(st.sampled_from(TARGET_NAMES[7:] + [3]), st.sampled_from([-1, 7]).map(bh.targets.Versus))
    target = data.draw(mostly(valid_target, invalid_target), label="target")
    x = data.draw(inputs_for(model), label="x")
    batch = x.shape[0] if x.dim() else 1
    classes = data.draw(classes_for(batch, model.num_classes), label="classes")
    options = data.draw(options_for(name, model), label="options")
    mode = data.draw(st.sampled_from(["none", "no_grad", "inference"]), label="grad mode")
    before = testing.model_state(runner)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with grad_mode(mode):
                if mode == "inference":
                    x = x.clone()
                e = bh.explain(runner, x, name, target, classes, **options)
    except errors.BackpropHooksError as exc:
        event(type(exc).__name__)
    else:
        event("result" + (" (compiled)" if compiled else ""))
        assert isinstance(e, bh.Explanation)
        assert e.logits.shape == (x.shape[0], model.num_classes)
        assert e.attributions.shape[0] == x.shape[0]
    testing.assert_same_state(runner, before)
    assert torch.is_grad_enabled()


# --------------------------------------------------------------------------------- the state machine
class Boom(Exception):
    """Raised on purpose by a rule."""


class Raising(Rule):
    """Raises in forward or in backward (after the module ran / while autograd runs)."""

    def __init__(self, where: str):
        self.where = where

    def forward(self, module, inputs, output):
        if self.where == "forward":
            raise Boom("forward")

    def backward(self, module, grad_input, grad_output):
        if self.where == "backward":
            raise Boom("backward")


def make_rule(kind: str) -> Rule:
    return {
        "identity": Identity,
        "capture": Capture,
        "guided": GuidedReLU,
        "epsilon": lambda: Epsilon(1e-6),
        "raise_forward": lambda: Raising("forward"),
        "raise_backward": lambda: Raising("backward"),
    }[kind]()


SELECTORS = {
    "identity": [nn.Conv2d, nn.Linear, "blocks.*", "head", ""],
    "capture": ["blocks.0", "stem", "pool"],
    "guided": [nn.ReLU],
    "epsilon": [nn.Conv2d, nn.Linear],
    "raise_forward": ["head", nn.ReLU, "blocks.0"],
    "raise_backward": ["stem.0", nn.Linear],
}


class HookLifecycle(RuleBasedStateMachine):
    """Random attach / forward / backward / remove / explain sequences; the model always ends as it began."""

    handles = Bundle("handles")
    outputs = Bundle("outputs")

    def __init__(self):
        super().__init__()
        self.model = testing.randomize(testing.CNN(3, 6, 4, 2, 3, act="relu"), seed=0)
        self.before = testing.model_state(self.model)
        self.live = []
        self.x = torch.rand(2, 3, 6, 6, dtype=torch.float64)

    @rule(target=handles, kind=st.sampled_from(sorted(SELECTORS)), data=st.data())
    def attach(self, kind, data):
        selector = data.draw(st.sampled_from(SELECTORS[kind]))
        handle = bh.attach(self.model, {selector: make_rule(kind)})
        self.live.append(handle)
        return handle

    @rule(target=outputs, grad=st.booleans())
    def forward(self, grad):
        xg = self.x.clone().requires_grad_(True)
        try:
            with torch.set_grad_enabled(grad):
                return (xg, self.model(xg))
        except Boom:
            return (xg, None)

    @rule(out=consumes(outputs))
    def backward(self, out):
        xg, y = out
        if y is None or not y.requires_grad:
            return
        try:
            torch.autograd.grad(y.sum(), xg)
        except (Boom, errors.BackpropHooksError):
            pass

    @rule(handle=consumes(handles))
    def remove(self, handle):
        handle.remove()
        self.live.remove(handle)

    @rule(
        name=st.sampled_from(["gradient", "gradcam", "lrp", "guided_backprop"]),
        objective=st.sampled_from(["weighted", "logit"]),
    )
    def explain(self, name, objective):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bh.explain(self.model, self.x, name, objective)
        except (Boom, errors.BackpropHooksError):
            pass

    @invariant()
    def only_live_handles_leave_hooks(self):
        testing.assert_handles_leave_no_trace(self.model, self.before, self.live, remove=False)

    def teardown(self):
        testing.assert_handles_leave_no_trace(self.model, self.before, self.live, remove=True)


TestHookLifecycle = HookLifecycle.TestCase
TestHookLifecycle.settings = settings(stateful_step_count=8, suppress_health_check=[HealthCheck.too_slow])
