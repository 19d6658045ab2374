"""Public test helpers: hypothesis strategies and assertions for rules and methods.

Users run these against the rules they write, exactly as the project's own tests do::

    from hypothesis import given
    from backprop_hooks import testing

    @given(testing.cases())
    def test_my_method(case):
        testing.assert_contrast_identities(MyMethod(case.model), case.x)

The oracle of :func:`assert_contrast_identities` is independent of :mod:`backprop_hooks.targets`: it
explains every class's logit separately (C passes) and composes them with weights written out explicitly,
e.g. ``φ_weighted = φ_t − Σ_{s≠t} α_s φ_s`` with ``α_s = p_s/(1−p_t) = e^{y_s} / Σ_{r≠t} e^{y_r}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .attach import is_framework_hook

try:  # hypothesis is a test extra; the assertions work without it
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


# --------------------------------------------------------------------------------------------- nets
class _Net(nn.Module):
    """What the random networks share: options ``act`` ("relu", "relu_inplace", "gelu"), ``batchnorm`` (a
    BatchNorm after each block's layer) and ``residual`` (each block adds its input)."""

    def __init__(self, input_shape, classes: int, act: str = "relu", batchnorm: bool = False, residual: bool = False):
        super().__init__()
        self.input_shape, self.num_classes = input_shape, classes
        self.act_name, self.batchnorm, self.residual = act, batchnorm, residual

    def block(self, layer: nn.Module, norm: nn.Module) -> nn.Sequential:
        return nn.Sequential(layer, *([norm] if self.batchnorm else []), _act(self.act_name))

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = h + block(h) if self.residual else block(h)
        return h


class MLP(_Net):
    """Linear layers with an activation, optional BatchNorm1d and residual adds (options: see ``_Net``)."""

    def __init__(self, features: int, width: int, depth: int, classes: int, **options: Any):
        super().__init__((features,), classes, **options)
        self.stem = nn.Linear(features, width)
        self.blocks = nn.ModuleList(self.block(nn.Linear(width, width), nn.BatchNorm1d(width)) for _ in range(depth))
        self.act = _act(self.act_name)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.run_blocks(self.act(self.stem(x))))


class CNN(_Net):
    """3x3 convolutions with an activation, optional BatchNorm2d and residual adds, average pooling, a head."""

    def __init__(self, channels: int, size: int, width: int, depth: int, classes: int, **options: Any):
        super().__init__((channels, size, size), classes, **options)
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), _act(self.act_name))
        self.blocks = nn.ModuleList(
            self.block(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)) for _ in range(depth)
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(width * 4, classes)

    def forward(self, x):
        return self.head(self.pool(self.run_blocks(self.stem(x))).flatten(1))


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "gelu": nn.GELU()}[name]


def randomize(model: nn.Module, seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Random weights and BatchNorm statistics from ``seed``; eval mode; ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    model = model.to(dtype)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=dtype) + 0.5)
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=dtype) * (1.0 / t[0].numel()) ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=dtype) * 0.2)
    return model.eval()


@dataclass
class Case:
    """A random model with an input batch: what the strategies draw."""

    model: nn.Module
    x: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


# --------------------------------------------------------------------------------------- strategies
def _require_hypothesis():
    if st is None:  # pragma: no cover
        raise ImportError("backprop_hooks.testing strategies need hypothesis: pip install hypothesis")


def networks(
    kinds: Iterable[str] = ("mlp", "cnn"),
    acts: Iterable[str] = ("relu", "relu_inplace", "gelu"),
    batchnorm: Optional[bool] = None,
    residual: Optional[bool] = None,
    dtype: torch.dtype = torch.float64,
):
    """Strategy: small random MLPs/CNNs (ReLU, in-place ReLU, GELU; BatchNorm and residual adds drawn)."""
    _require_hypothesis()
    kinds, acts = tuple(kinds), tuple(acts)

    @st.composite
    def build(draw):
        kind = draw(st.sampled_from(kinds))
        act = draw(st.sampled_from(acts))
        bn = draw(st.booleans()) if batchnorm is None else batchnorm
        res = draw(st.booleans()) if residual is None else residual
        classes = draw(st.integers(2, 6))
        depth = draw(st.integers(1, 3))
        options = dict(act=act, batchnorm=bn, residual=res)
        if kind == "mlp":
            net = MLP(draw(st.integers(2, 8)), draw(st.integers(2, 8)), depth, classes, **options)
        else:
            channels, size, width = draw(st.integers(1, 3)), draw(st.sampled_from([4, 6, 8])), draw(st.integers(2, 5))
            net = CNN(channels, size, width, depth, classes, **options)
        return randomize(net, draw(st.integers(0, 2**31 - 1)), dtype)

    return build()


def inputs(model: nn.Module, batch: Tuple[int, int] = (1, 4), dtype: torch.dtype = torch.float64):
    """Strategy: a random input batch for a model with an ``input_shape`` attribute."""
    _require_hypothesis()
    return st.builds(
        lambda b, seed: torch.randn(
            (b, *model.input_shape), generator=torch.Generator().manual_seed(seed), dtype=dtype
        ),
        st.integers(*batch),
        st.integers(0, 2**31 - 1),
    )


def cases(batch: Tuple[int, int] = (1, 4), dtype: torch.dtype = torch.float64, **network_options):
    """Strategy: a :class:`Case` (random network and a matching input batch)."""
    _require_hypothesis()
    return networks(dtype=dtype, **network_options).flatmap(lambda m: inputs(m, batch, dtype).map(lambda x: Case(m, x)))


def examples(n: int, reference: int = 25) -> int:
    """A Hypothesis budget that follows the loaded profile: ``n`` examples where the profile's
    ``max_examples`` is ``reference`` (the project's default profile), proportionally more under a larger
    one (``HYPOTHESIS_PROFILE=thorough``), never fewer than one. Use it instead of a fixed
    ``@settings(max_examples=n)`` for properties that are too costly for the full default budget."""
    _require_hypothesis()
    from hypothesis import settings

    return max(1, round(n * settings.default.max_examples / reference))


def logits(
    batch: Tuple[int, int] = (1, 8),
    classes: Tuple[int, int] = (2, 12),
    scale: Tuple[float, float] = (1e-3, 50.0),
    dtype: torch.dtype = torch.float64,
):
    """Strategy: random logits (B, C) of spread ``scale`` (large spreads drive p_t to 1)."""
    _require_hypothesis()
    return st.builds(
        lambda b, c, s, seed: (
            torch.randn((b, c), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(s).to(dtype)
        ),
        st.integers(*batch),
        st.integers(*classes),
        st.floats(*scale),
        st.integers(0, 2**31 - 1),
    )


def classes_for(logits_: torch.Tensor):
    """Strategy: a (B,) tensor of valid classes for ``logits_``."""
    _require_hypothesis()
    b, c = logits_.shape
    return st.lists(st.integers(0, c - 1), min_size=b, max_size=b).map(lambda v: torch.tensor(v, dtype=torch.long))


# ---------------------------------------------------------------------------------------- assertions
def contrast_weights(
    logits_: torch.Tensor, classes: torch.Tensor, target: str, other: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Explicit composition weights ``w[b, s]`` with ``φ_target = Σ_s w[b,s] φ_s`` (the test oracle).

    Written out in float64 from exponentials of shifted logits, independently of
    :mod:`backprop_hooks.targets`: ``α_s = p_s/(1−p_t) = e^{y_s−m} / Σ_{r≠t} e^{y_r−m}`` with
    ``m = max_{r≠t} y_r``; ``p_t = e^{y_t−M} / Σ_r e^{y_r−M}`` and ``1−p_t = Σ_{s≠t} e^{y_s−M} / Σ_r e^{y_r−M}``
    with ``M = max_r y_r``. Nothing is subtracted from 1, so the weights stay exact to float64 rounding
    also when ``p_t → 1`` (``p_s/(1−p_t)`` from probabilities loses digits there).
    """
    y = logits_.detach().double()
    b, c = y.shape
    rows = torch.arange(b, device=y.device)
    e_t = torch.zeros_like(y)
    e_t[rows, classes] = 1.0
    others = e_t == 0
    m = torch.where(others, y, -float("inf")).max(dim=1, keepdim=True).values
    exp_others = torch.where(others, torch.exp(y - m), torch.zeros_like(y))  # e^{y_s − m}, 0 at t
    alpha = exp_others / exp_others.sum(dim=1, keepdim=True)
    exp_all = torch.exp(y - y.max(dim=1, keepdim=True).values)
    one_minus_p_t = (exp_all * others).sum(dim=1) / exp_all.sum(dim=1)
    p_t = exp_all[rows, classes] / exp_all.sum(dim=1)
    weighted = e_t - alpha
    if target == "logit":
        return e_t
    if target == "weighted":
        return weighted
    if target == "softmax":
        return (p_t * one_minus_p_t)[:, None] * weighted
    if target == "log_softmax":
        return one_minus_p_t[:, None] * weighted
    if target == "mean":
        return e_t - (1 - e_t) / (c - 1)
    if target == "max":
        runner = y.clone()
        runner[rows, classes] = -float("inf")
        s_star = runner.argmax(dim=1)
        out = e_t.clone()
        out[rows, s_star] -= 1.0
        return out
    if target == "versus":
        out = e_t.clone()
        out[rows, other] -= 1.0
        return out
    raise ValueError(f"no explicit composition for target {target!r}")


def per_class(method: Callable, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``φ_s`` for every class s: one logit explanation per class, stacked as (C, B, ...)."""
    return torch.stack([method(x, classes=s, target="logit").attributions for s in range(num_classes)])


def assert_contrast_identities(
    method: Callable,
    x: torch.Tensor,
    classes: Any = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    targets: Iterable[str] = ("weighted", "softmax", "log_softmax", "mean", "max", "versus"),
) -> None:
    """Check the contrast identities (see :mod:`backprop_hooks.targets`) for ``method``, called as
    ``method(x, classes=..., target=...)``.

    Every contrast target's attributions must equal the explicit composition of the C per-class logit
    explanations. Tolerances are relative to the largest per-class attribution.

    A case where every per-class attribution is zero (e.g. a ReLU network whose units are all inactive at
    ``x``) tests nothing: inside a Hypothesis test the example is rejected (``assume``), so another is
    drawn; called directly, the assertion fails and says so.
    """
    from . import targets as _targets

    base = method(x, classes=classes, target="logit")
    y, t = base.logits, base.classes
    c = y.shape[1]
    phi = per_class(method, x, c).double()  # (C, B, ...)
    scale = float(phi.abs().max())
    if not scale > 0:
        _degenerate(
            f"{getattr(method, 'name', method)!r}: every per-class attribution is zero at this input, so the "
            "contrast identities hold trivially and test nothing; choose another input or model"
        )
    other = (t + 1) % c
    for name in targets:
        target = _targets.Versus(other) if name == "versus" else name
        got = method(x, classes=t, target=target).attributions.double()
        w = contrast_weights(y, t, name, other)  # (B, C), float64
        want = torch.einsum("bs,sb...->b...", w, phi)
        err = float((got - want).abs().max())
        tol = atol + rtol * scale
        if not err <= tol:
            raise AssertionError(
                f"{getattr(method, 'name', method)!r}: target {name!r} differs from its explicit per-class "
                f"composition by {err:.3e} (tolerance {tol:.3e}, max |φ_s| {scale:.3e})"
            )


def _degenerate(message: str) -> None:
    """Reject the example inside a Hypothesis test (another is drawn); fail anywhere else."""
    try:
        from hypothesis import assume
        from hypothesis.control import currently_in_test_context
    except ImportError:  # pragma: no cover
        currently_in_test_context = None
    if currently_in_test_context is not None and currently_in_test_context():
        assume(False)
    raise AssertionError(message)


def assert_batch_equals_single(
    method: Callable, x: torch.Tensor, target: Any = "weighted", rtol: float = 1e-6, atol: float = 1e-9
) -> None:
    """The attributions of a batch equal those of each sample explained alone (an all-zero batch is
    degenerate, as in :func:`assert_contrast_identities`)."""
    batch = method(x, target=target)
    if not bool((batch.attributions != 0).any()):
        _degenerate(f"{getattr(method, 'name', method)!r}: every attribution of the batch is zero; this tests nothing")
    for i in range(x.shape[0]):
        single = method(x[i : i + 1], classes=batch.classes[i : i + 1], target=target)
        torch.testing.assert_close(batch.attributions[i : i + 1], single.attributions, rtol=rtol, atol=atol)


def framework_hooks(model: nn.Module) -> list:
    """Names of modules that still carry a hook placed by :func:`backprop_hooks.attach`."""
    return [
        f"{name or '<root>'}.{attr}"
        for name, module in model.named_modules()
        for attr in HOOK_DICTS
        if any(is_framework_hook(fn) for fn in getattr(module, attr, {}).values())
    ]


def assert_no_hooks_left(model: nn.Module) -> None:
    """No hook placed by backprop_hooks remains anywhere in ``model``."""
    left = framework_hooks(model)
    if left:
        raise AssertionError(f"backprop_hooks left hooks on: {', '.join(left)}")


def model_state(model: nn.Module) -> Dict[str, Any]:
    """A snapshot of everything an explanation must leave unchanged (compare with :func:`assert_same_state`)."""
    return {
        "params": {
            n: (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        },
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: tuple(tuple(getattr(m, a, {}).keys()) for a in HOOK_DICTS) for n, m in model.named_modules()},
    }


def assert_same_state(model: nn.Module, before: Dict[str, Any]) -> None:
    """``model`` is bit-identical to the snapshot: values, grads, requires_grad, training flags, hooks."""
    after = model_state(model)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
                return False
            return torch.equal(a, b) or bool(((a == b) | (a != a) & (b != b)).all())  # NaN stays NaN
        if isinstance(a, (tuple, list)):
            return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
        return a == b

    for part in before:
        if before[part].keys() != after[part].keys():
            raise AssertionError(f"model {part} changed: {sorted(set(before[part]) ^ set(after[part]))}")
        changed = [k for k in before[part] if not same(before[part][k], after[part][k])]
        if changed:
            raise AssertionError(f"model {part} changed for: {', '.join(changed[:10])}")
    assert_no_hooks_left(model)


def assert_handles_leave_no_trace(
    model: nn.Module, before: Dict[str, Any], handles: Iterable[Any], remove: bool
) -> None:
    """For stateful tests of rules: with no handle left, ``model`` is as it was (``before``: its
    :func:`model_state`); ``remove=True`` removes every handle first (a state machine's teardown)."""
    handles = list(handles)
    if remove:
        for handle in handles:
            handle.remove()
    elif handles:
        return
    assert_same_state(model, before)
