"""Correct wherever a user calls it: under torch.no_grad(), on inference tensors, on compiled models
(torch.compile(m), m.compile(), a compiled submodule), from several threads."""

import copy
import shutil
import threading
import warnings

import pytest
import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks import errors, runtime, testing
from backprop_hooks.rule import Function

pytestmark = pytest.mark.filterwarnings("ignore::backprop_hooks.errors.NonLinearContrastWarning")

CNN_METHODS = [m for m in bh.methods.available() if bh.methods.get(m).space != "tokens"]
RULE_FREE = ["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"]
# one of each call path (the base template, many points, a layer, two backwards, rules with state)
FEW = ["gradient", "smoothgrad", "gradcam", "guided_gradcam", "lrp", "fullgrad"]
SLOW_REST = [pytest.param(m, marks=pytest.mark.slow) for m in CNN_METHODS if m not in FEW]
OPTIONS = {"smoothgrad": {"n_samples": 3, "seed": 0}, "integrated_gradients": {"n_steps": 3}}


def options(name, **extra):
    opts = dict(OPTIONS.get(name, {}))
    if bh.methods.get(name).takes_layer:
        opts["layer"] = "blocks.0"
    return {**opts, **extra}


def small_cnn(seed=0):
    return testing.randomize(testing.CNN(3, 8, 5, 2, 4, act="relu_inplace", batchnorm=True, residual=True), seed=seed)


@pytest.fixture(scope="module")
def net():
    return small_cnn()


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(net, x):
    return {name: bh.explain(net, x, name, "weighted", **options(name)) for name in CNN_METHODS}


def assert_same(got, want, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(got.logits, want.logits, rtol=rtol, atol=atol)
    torch.testing.assert_close(got.attributions, want.attributions, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- no_grad, inference mode
@pytest.mark.parametrize("name", FEW + SLOW_REST)
def test_no_grad_and_inference_mode_give_the_same_numbers(net, x, reference, name):
    before = testing.model_state(net)
    with torch.no_grad():
        assert_same(bh.explain(net, x, name, "weighted", **options(name)), reference[name])
        assert not torch.is_grad_enabled()  # the caller's mode is back
    with torch.inference_mode():
        xi = x.clone()
        e = bh.explain(net, xi, name, "weighted", **options(name))
        assert torch.is_inference_mode_enabled()
    assert xi.is_inference() and not e.attributions.is_inference()
    assert_same(e, reference[name])
    assert_same(bh.explain(net, xi, name, "weighted", **options(name)), reference[name])  # outside, same tensor
    testing.assert_same_state(net, before)


@pytest.mark.slow
def test_resnet18_under_no_grad():
    """The issue's report: gradient, fullgrad, guided_backprop, lrp crashed and gradcam refused under no_grad."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name in ["gradient", "fullgrad", "guided_backprop", "lrp", "gradcam"]:
        opts = {"layer": "layer4"} if name == "gradcam" else {}
        want = bh.explain(model, x, name, "weighted", **opts).attributions
        with torch.no_grad():
            got = bh.explain(model, x, name, "weighted", **opts).attributions
        with torch.inference_mode():
            got_inference = bh.explain(model, x.clone(), name, "weighted", **opts).attributions
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got_inference, want, rtol=0, atol=0)
    testing.assert_no_hooks_left(model)


def test_model_built_in_inference_mode_is_a_typed_error(x):
    with torch.inference_mode():
        model = small_cnn()
    with pytest.raises(errors.ModelError, match="inference tensor.*outside torch.inference_mode"):
        bh.explain(model, x)
    copied = copy.deepcopy(model)  # the fix the message gives
    assert_same(bh.explain(copied, x, "gradient", "weighted"), bh.explain(small_cnn(), x, "gradient", "weighted"))


# ---------------------------------------------------------------------------------- compiled models
class CountingBackend:
    """A torch.compile backend that runs the traced graph eagerly and counts its runs."""

    def __init__(self):
        self.runs = 0

    def __call__(self, gm, example_inputs):
        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


def compiled(model, how, backend):
    if how == "wrapper":
        return torch.compile(model, backend=backend)
    model.compile(backend=backend)
    return model


def check_compiled(model, eager, x, names, rtol=1e-9, atol=1e-12):
    """Every method on ``model`` (compiled) equals ``eager``; rule methods say once that they run eagerly."""
    torch._dynamo.reset()
    y = model(x.clone().requires_grad_(True))  # the compiled graph has run once with gradients
    torch.autograd.grad(y.sum(), [p for p in model.parameters()][:1])
    before = testing.model_state(model)
    for name in names:
        want = bh.explain(eager, x, name, "weighted", **options(name))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = bh.explain(model, x, name, "weighted", **options(name))
            again = bh.explain(model, x, name, "weighted", **options(name))
        assert_same(got, want, rtol, atol)
        assert_same(again, want, rtol, atol)
        eager_warnings = [w for w in seen if issubclass(w.category, errors.CompiledModelWarning)]
        assert len(eager_warnings) == (0 if name in RULE_FREE else 1), name  # said once, rule methods only
        if got.layer is not None:
            assert got.layer == "blocks.0"
    testing.assert_same_state(model, before)


@pytest.mark.parametrize("how", ["wrapper", "method"])
def test_compiled_eager_backend_gives_the_eager_answer(x, how):
    check_compiled(compiled(small_cnn(), how, "eager"), small_cnn(), x, ["gradient", "smoothgrad", "gradcam", "lrp"])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["wrapper", "method"])
def test_compiled_eager_backend_every_method(x, how):
    check_compiled(compiled(small_cnn(), how, "eager"), small_cnn(), x, CNN_METHODS)


def test_gradient_family_runs_the_compiled_graph_and_rule_methods_do_not(x):
    backend = CountingBackend()
    model = torch.compile(small_cnn(), backend=backend)
    for name in RULE_FREE:
        runs = backend.runs
        bh.explain(model, x, name, "weighted", **options(name))
        assert backend.runs > runs, name
    for name in ["lrp", "gradcam", "guided_backprop", "fullgrad"]:
        runs = backend.runs
        with pytest.warns(errors.CompiledModelWarning, match=f"{name} on a compiled CNN.*the eager module runs"):
            bh.explain(model, x, name, "weighted", **options(name))
        assert backend.runs == runs, name


def test_layer_names_of_the_original_model(x):
    model = torch.compile(small_cnn(), backend="eager")
    assert [n for n, _ in runtime.named_modules(model)] == [n for n, _ in small_cnn().named_modules()]
    e = bh.methods.GradCAM(model, layer="blocks.0")(x, target="weighted")
    assert e.layer == "blocks.0"
    assert bh.methods.get_module(model, "blocks.0") is model._orig_mod.blocks[0]
    # a name copied from the compiled wrapper's own listing works too
    assert bh.explain(model, x, "gradcam", layer="_orig_mod.blocks.0").layer == "blocks.0"
    with pytest.raises(errors.UnknownNameError, match="not a module of CNN; close matches: .*'blocks.0'"):
        bh.explain(model, x, "gradcam", layer="blocks.9")


def test_compiled_submodule_and_compiled_forward(x):
    eager = small_cnn()
    inner = small_cnn()
    inner.blocks[0] = torch.compile(inner.blocks[0], backend="eager")
    check_compiled(inner, eager, x, ["lrp", "gradcam", "guided_backprop", "gradient"])
    fwd = small_cnn()
    fwd.forward = torch.compile(fwd.forward, backend="eager")
    check_compiled(fwd, eager, x, ["lrp", "fullgrad", "gradient"])
    del fwd.forward


@pytest.mark.slow
def test_compiled_inductor_gives_the_eager_answer(x):
    if shutil.which("g++") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        pytest.skip("inductor on CPU compiles C++: no C++ compiler on this machine")
    check_compiled(torch.compile(small_cnn(), backend="inductor"), small_cnn(), x, CNN_METHODS, rtol=1e-7, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["wrapper", "method"])
def test_compiled_resnet18_lrp_and_gradcam(how):
    """The issue's report: lrp silently wrong after a compiled run with gradients; layer4 refused."""
    torchvision = pytest.importorskip("torchvision")
    eager = torchvision.models.resnet18(weights=None).eval()
    model = compiled(copy.deepcopy(eager), how, "aot_eager")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model(x.clone().requires_grad_(True)).sum().backward()
    for p in model.parameters():
        p.grad = None
    for name, opts in [("lrp", {}), ("gradcam", {"layer": "layer4"}), ("gradient", {})]:
        want = bh.explain(eager, x, name, "weighted", **opts).attributions
        got = bh.explain(model, x, name, "weighted", **opts).attributions
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    testing.assert_no_hooks_left(model)


# ------------------------------------------------------------------------------------------ threads
def run_threads(jobs, n_threads):
    """Run ``jobs[i % len(jobs)]`` in ``n_threads`` threads started together; results and errors by thread."""
    barrier = threading.Barrier(n_threads)
    results, failures = [None] * n_threads, []

    def work(i):
        try:
            barrier.wait()
            results[i] = jobs[i % len(jobs)]()
        except BaseException as exc:  # noqa: BLE001  (the test reports every failure)
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, failures


@pytest.mark.parametrize(
    "name",
    [
        "gradcam",
        "lrp",
        pytest.param("guided_backprop", marks=pytest.mark.slow),
        pytest.param("gradient", marks=pytest.mark.slow),
    ],
)
def test_threads_explaining_one_model(name):
    """Threads explaining one model at once get the serial answers (each call holds the model's lock)."""
    model = testing.randomize(testing.CNN(3, 16, 8, 2, 4, act="relu_inplace", batchnorm=True), seed=3)
    xs = [torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [bh.explain(model, x, name, "weighted").attributions for x in xs]
    before = testing.model_state(model)
    for _ in range(3):  # 3 rounds x 8 threads x 2 calls: fails every time without the lock and thread-aware hooks
        jobs = [
            lambda i=i: [bh.explain(model, xs[i], name, "weighted").attributions for _ in range(2)] for i in range(4)
        ]
        results, failures = run_threads(jobs, 8)
        assert failures == []
        for i, got in enumerate(results):
            for g in got:
                torch.testing.assert_close(g, want[i % 4], rtol=0, atol=0)
    testing.assert_same_state(model, before)


def test_separate_models_run_in_parallel(x):
    """Model A's explanation waits inside its forward until model B's explanation has finished in another
    thread: with one lock for all models this would never happen."""
    b_done = threading.Event()
    waited = []

    class Waits(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, x):
            waited.append(b_done.wait(timeout=30))
            return self.net(x)

    a, b = Waits().eval(), small_cnn(seed=1)

    def explain_b():
        bh.explain(b, x, "lrp", "weighted")
        b_done.set()

    results, failures = run_threads([lambda: bh.explain(a, x, "lrp", "weighted"), explain_b], 2)
    assert failures == [] and waited == [True]


def test_rules_act_only_in_the_attaching_thread(x):
    """A forward pass of the same model in another thread, while rules are attached, is plain autograd."""
    model = small_cnn()
    xg = x.clone().requires_grad_(True)
    plain = torch.autograd.grad(model(xg).sum(), xg)[0]
    zero = Function(lambda m, gi, go: tuple(None if g is None else torch.zeros_like(g) for g in gi))
    with bh.attach(model, {nn.Conv2d: zero}):
        other = []
        t = threading.Thread(target=lambda: other.append(torch.autograd.grad(model(xg).sum(), xg)[0]))
        t.start()
        t.join()
        here = torch.autograd.grad(model(xg).sum(), xg)[0]
    torch.testing.assert_close(other[0], plain, rtol=0, atol=0)
    assert here.abs().max() == 0
