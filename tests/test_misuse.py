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
from backprop_hooks.text import TEXT_METHODS

import _hf

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
    return {**options, **draw(bad_options(cls))}


def bad_options(cls):
    """Mostly nothing; else a typo (``n_step``, ``layr``), a made-up name, or ``layer=`` on a method without one."""
    names = ["n_step", "layr", "bogus"] + (["layer"] if cls is not None and not cls.takes_layer else [])
    return mostly(st.just({}), st.sampled_from(names).map(lambda n: {n: 1}))


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
    poison = data.draw(mostly(st.none(), st.sampled_from([float("nan"), float("inf")])), label="poisoned weight")
    if poison is not None:  # a NaN or Inf weight: non-finite logits
        with torch.no_grad():
            model.head.bias[0] = poison
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
        assert torch.isfinite(e.logits).all()  # non-finite logits are refused, never explained
    testing.assert_same_state(runner, before)
    assert torch.is_grad_enabled()


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_explain_text_result_or_typed_error(data):
    """``bh.explain_text`` on small Hugging Face models with random ids (some outside the vocabulary), masks
    (some rows all padding), lengths (some past GPT-2's positions), methods, targets, classes and options."""
    name = data.draw(st.sampled_from(["bert", "gpt2"]), label="model")
    model, read = text_model(name)
    limit = model.config.n_positions if name == "gpt2" else 8
    batch = data.draw(st.integers(1, 3), label="batch")
    length = data.draw(mostly(st.integers(1, 8), st.integers(limit + 1, limit + 3)), label="length")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="ids seed"))
    ids = torch.randint(0, _hf.VOCAB, (batch, length), generator=g)
    bad_id = data.draw(mostly(st.none(), st.sampled_from([-1, _hf.VOCAB, _hf.VOCAB + 5])), label="bad id")
    if bad_id is not None:
        ids[-1, -1] = bad_id
    kind = data.draw(mostly(st.sampled_from(["none", "ones", "right"]), st.sampled_from(["empty row", "two"])))
    mask = None if kind == "none" else torch.ones_like(ids)
    if kind == "right":  # right padding, at least one token left
        mask[-1, length // 2 + 1 :] = 0
    elif kind == "empty row":
        mask[0] = 0
    elif kind == "two":
        mask[0, 0] = 2
    method = data.draw(mostly(st.sampled_from(TEXT_METHODS), st.just("nope")), label="method")
    valid_target = st.one_of(st.sampled_from(TARGET_NAMES[:7]), st.integers(0, 2).map(bh.targets.Versus))
    target = data.draw(mostly(valid_target, st.sampled_from(["bogus", "versus:99"])), label="target")
    classes = data.draw(classes_for(batch, 3), label="classes")
    options = {**OPTIONS.get(method, {}), **data.draw(bad_options(None), label="options")}
    before = testing.model_state(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = bh.explain_text(model, ids, mask, method, target, classes, **read, **options)
    except errors.BackpropHooksError as exc:
        event(type(exc).__name__)
    else:
        event("result")
        assert e.attributions.shape == ids.shape and torch.isfinite(e.logits).all()
    testing.assert_same_state(model, before)


_TEXT_MODELS = {}


def text_model(name: str):
    """A small Hugging Face model (built once) and the read-out of its logits (a causal LM's next token)."""
    if name not in _TEXT_MODELS:
        _TEXT_MODELS[name] = _hf.build(name)
    read = {"logits": lambda out: out.logits[:, -1]} if name == "gpt2" else {}
    return _TEXT_MODELS[name], read


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
