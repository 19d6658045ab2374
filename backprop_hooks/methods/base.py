"""The method template: one forward, one seeded backward, a read-out.

A method is a short composition of

* ``rules()``: the backward rules it attaches for the duration of one explanation;
* a target (any of :mod:`backprop_hooks.targets`), turned into a seed on the logits;
* ``attribute(x, logits, seed)``: one ``torch.autograd.grad`` from the logits with that seed, down to
  whatever the method reads out (the input, a captured layer, ...).

The logits are the model's output when it is a (B, C) tensor, its tensor ``.logits`` attribute (Hugging
Face ``ModelOutput``) or its ``"logits"`` key (a dict). Any other output needs ``logits=fn`` (output ->
(B, C) logits), a per-call option of every method: ``method(x, classes, target, logits=fn)``, and
``bh.explain(..., logits=fn)``. Examples: ``lambda out: out[0]`` (a tuple), ``lambda out: out.logits[:, -1]``
(a causal language model's next token on an unpadded batch; ``bh.explain_text`` reads padded ones right),
``lambda out: out["scores"]`` (a detection head's class scores).

Where it runs: every call enables gradients and leaves inference mode inside the call only (so it works
under ``torch.no_grad()`` and ``torch.inference_mode()``, on inference tensors, with the same numbers),
holds the model's lock (one model explained from several threads: one call at a time), and on a compiled
model (``torch.compile(model)``, ``model.compile()``) runs the compiled graph when the method attaches no
rules (the gradient family: the contrast is only the seed) and the eager module otherwise, with a
:class:`~backprop_hooks.errors.CompiledModelWarning` once per model and method. Layer names are those of
the original model. See :mod:`backprop_hooks.runtime`.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
import weakref
from typing import Any, Callable, ClassVar, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from .. import targets as _targets
from ..attach import RuleSpec, attach
from ..checkpointing import gradients
from ..precision import widen
from ..errors import (
    CompiledModelWarning,
    NonLinearContrastWarning,
    TrainingModeWarning,
    UnknownNameError,
    choices,
)
from ..explanation import Explanation
from ..options import check_options, constructor_options
from ..runtime import check_parameters, eager_call, explaining, forward_errors, is_compiled, unwrap, usable
from ..validate import (
    Classes,
    LogitsFn,
    check_classes,
    check_finite_logits,
    check_input,
    check_logits_fn,
    check_model,
    select_logits,
    training_effects,
)

_REGISTRY: Dict[str, Type["Method"]] = {}
_WARNED_EAGER: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def register(cls: Type["Method"]) -> Type["Method"]:
    """Class decorator: make a method available to ``bh.explain(method=cls.name)``."""
    _REGISTRY[cls.name] = cls
    return cls


def available() -> List[str]:
    """Names usable as ``bh.explain(method=...)``."""
    return sorted(_REGISTRY)


def get(name: str) -> Type["Method"]:
    """The method class registered as ``name`` (``"gradcam"``); :class:`~backprop_hooks.errors.UnknownNameError`
    lists the names when there is none."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown method {name!r}; available: {choices(available(), 30)}")
    return _REGISTRY[name]


def create(name: str, model: nn.Module, **options: Any) -> "Method":
    """The method ``name`` on ``model`` with ``options``; an unknown option is an
    :class:`~backprop_hooks.errors.OptionError` that names the method's options (and close matches) before anything
    is built."""
    cls = get(name)
    cls.check_options(options)
    return cls(model, **options)


class Method:
    """Base class. Subclasses set ``name``/``linear`` and implement ``attribute`` (and maybe ``rules``)."""

    name: ClassVar[str] = "method"
    linear: ClassVar[bool] = True
    takes_layer: ClassVar[bool] = False  # does the constructor take ``layer=``?
    space: ClassVar[str] = "input"  # attributions: "input"-shaped, a "layer" grid (B,h,w) or a "tokens" grid
    per_call: ClassVar[Tuple[str, ...]] = ()  # attributes holding one call's state, dropped when it returns
    intercepts_calls: ClassVar[bool] = False  # rules on function calls during the forward: never a compiled graph

    def __init__(self, model: nn.Module, check_finite: bool = True):
        """``check_finite``: refuse NaN or Inf in the input and in the logits (one host synchronisation each)."""
        self.original = check_model(model)  # what the user passed: maybe a compiled wrapper
        self.model = unwrap(model)  # the module itself: names as in the original model
        self.check_finite = check_finite
        self.logits_fn: Optional[LogitsFn] = None  # the call's logits= selector
        self.run: Callable[..., Any] = self.model  # the call's forward: compiled graph or eager module

    @classmethod
    def options(cls) -> List[str]:
        """The keyword options of the constructor (``layer``, ``n_steps``, ...), without ``model``."""
        return constructor_options(cls)

    @classmethod
    def check_options(cls, options: Dict[str, Any], also: Sequence[str] = (), caller: str = "") -> None:
        """:class:`~backprop_hooks.errors.OptionError` for an option the constructor does not take, naming those it
        takes; ``also``: the keywords of the ``caller`` (``bh.explain``: ``classes``...), listed too, as close matches
        of a typo."""

        def elsewhere(name: str) -> str:
            takers = [m for m in available() if name in _REGISTRY[m].options()]
            return f", an option of {choices(takers)}" if takers else ""

        what = f"{caller} with method {cls.name!r}" if caller else f"method {cls.name!r}"
        check_options(options, [*cls.options(), *also], what, elsewhere)

    def runner(self, spec: RuleSpec) -> Callable[..., Any]:
        """The forward of one call: the compiled graph when no rules are attached (to modules or, with
        ``intercepts_calls``, to function calls), else the eager module."""
        if not is_compiled(self.original):
            return self.model
        if not spec and not self.intercepts_calls:
            return self.original
        warned = _WARNED_EAGER.setdefault(self.model, set())
        if self.name not in warned:
            warned.add(self.name)
            warnings.warn(
                f"{self.name} on a compiled {type(self.model).__name__}: its backward rules live in module hooks "
                "(or function calls), which a compiled graph does not run, so the eager module runs (same answer, "
                "eager speed); "
                "gradient, input_x_gradient, smoothgrad and integrated_gradients run the compiled graph",
                CompiledModelWarning,
                stacklevel=4,
            )
        return lambda *args, **kwargs: eager_call(self.model, *args, **kwargs)

    @contextlib.contextmanager
    def session(self, logits: Optional[LogitsFn]) -> Iterator[None]:
        """One call: the model's lock, gradients on, inference mode off; per-call state dropped at the end."""
        with explaining(self.model):
            self.logits_fn = check_logits_fn(logits)
            try:
                yield
            finally:
                self.release()
                self.logits_fn, self.run = None, self.model

    def forward_context(self, x: torch.Tensor) -> ContextManager:
        """What the method's forward pass runs inside (function-level rules); nothing by default."""
        return contextlib.nullcontext()

    def model_output(self, x: torch.Tensor) -> Any:
        """Run the call's forward on ``x`` inside :meth:`forward_context`: the model's raw output."""
        with forward_errors(self.model, x), self.forward_context(x):
            return self.run(x)

    def model_logits(self, x: torch.Tensor, samples: Optional[int] = None) -> torch.Tensor:
        """Run the call's forward on ``x`` and select the (B, C) logits; typed errors for both steps and, with
        ``check_finite``, for NaN or Inf logits (``samples``: ``x`` stacks points of that many samples)."""
        logits = self.logits(self.model_output(x), x.shape[0])
        if not self.check_finite:
            return logits
        return check_finite_logits(logits, samples, f" at the points {self.name} evaluates" if samples else "")

    def logits(self, output: Any, batch: int) -> torch.Tensor:
        """The checked (B, C) logits in the model's ``output`` (see ``logits=`` in the module docstring)."""
        return select_logits(output, batch, self.logits_fn)

    # -- what subclasses provide -------------------------------------------------------------------
    def rules(self, x: torch.Tensor) -> RuleSpec:
        """The rules attached during one explanation of ``x`` (none by default)."""
        return []

    def attribute(self, x: torch.Tensor, logits: torch.Tensor, seed: torch.Tensor):
        """Back-propagate ``seed`` from ``logits`` and read out the attributions: a tensor, or a pair
        ``(attributions, extras)`` whose dict lands in ``Explanation.extras``."""
        raise NotImplementedError

    @property
    def layer_name(self) -> Optional[str]:
        return None

    def release(self) -> None:
        """Drop one call's state (captured activations would keep the call's autograd graph alive)."""
        for attribute in self.per_call:
            setattr(self, attribute, None)

    # -- the template ------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, target: Any) -> Tuple[torch.Tensor, _targets.Target]:
        effects = training_effects(self.model) if self.model.training else []
        if effects:  # training mode with no dropout and no batch statistics (gradient checkpointing) is fine
            warnings.warn(
                f"{type(self.model).__name__} is in training mode, which changes its forward pass: active dropout "
                f"or batch statistics in {choices(effects, 3)}; call model.eval() before explaining (or set every "
                "dropout to 0, as gradient checkpointing in training mode needs)",
                TrainingModeWarning,
                stacklevel=3,
            )
        check_parameters(self.model)
        embeds_tokens = callable(getattr(self.model, "get_input_embeddings", None))
        return usable(check_input(x, self.check_finite, embeds_tokens)), _targets.get(target)

    def forward(self, x: torch.Tensor, classes: Classes, target: _targets.Target):
        """Run the model on ``x``; return checked logits, resolved classes and the target's seed."""
        logits = self.model_logits(x)
        target.check(logits.shape[1])
        classes = check_classes(usable(classes), logits)
        target.check_explained(logits, classes)
        return logits, classes, target.seed(widen(logits.detach()), classes)  # float32 for a half-precision model

    def __call__(
        self, x: torch.Tensor, classes: Classes = None, target: Any = "logit", logits: Optional[LogitsFn] = None
    ) -> Explanation:
        """Explain ``classes`` (``None``: the predicted ones) of ``x`` with ``target``; ``logits=fn`` selects
        the (B, C) logits from a model output that is not one (see the module docstring)."""
        with self.session(logits):
            x, target = self.prepare(x, target)
            spec = self.rules(x)
            self.run = self.runner(spec)
            with attach(self.model, spec) as handle:
                xg = x.detach().requires_grad_(True)
                logits, classes, seed = self.forward(xg, classes, target)
                out = self.attribute(xg, logits, seed)
                linear = self.linear and handle.linear
        attributions, extras = out if isinstance(out, tuple) else (out, {})
        return self.result(attributions, logits, classes, target, linear, x, **extras)

    def result(self, attributions, logits, classes, target, linear: bool, x: torch.Tensor, **extras) -> Explanation:
        if target.contrastive and not linear:
            warnings.warn(
                f"method {self.name!r} is not linear in the seed: the {target.name!r} explanation is the "
                "back-propagated contrast seed, not the per-class composition φ_t − Σ_s α_s φ_s of the logit "
                "explanations",
                NonLinearContrastWarning,
                stacklevel=3,
            )
        if isinstance(target, _targets.Versus):  # "t and not s": the explanation names s (an int or a tensor)
            extras = {"versus": target.other, **extras}
        return Explanation(
            attributions=attributions.detach(),
            logits=logits.detach(),
            classes=classes,
            method=self.name,
            target=target.name,
            linear=linear,
            input_shape=tuple(x.shape),
            layer=self.layer_name,
            extras=extras,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__})"


_SEVERAL_SEEDS: contextvars.ContextVar[Tuple[bool, bool]] = contextvars.ContextVar(
    "several_seeds", default=(False, False)
)


@contextlib.contextmanager
def several_seeds(batched: bool = False) -> Iterator[None]:
    """Inside, :func:`grad` keeps the autograd graph, so one forward pass serves several seeds (``retain_graph``);
    with ``batched``, a seed with a leading axis of ``k`` is ``k`` seeds in one backward pass
    (``is_grads_batched``: the vector-Jacobian products vectorised), and each gradient gets that axis."""
    token = _SEVERAL_SEEDS.set((True, batched))
    try:
        yield
    finally:
        _SEVERAL_SEEDS.reset(token)


def grad(outputs: torch.Tensor, inputs, seed: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """One seeded vector-Jacobian product; parameters' ``.grad`` are never touched (see ``several_seeds``)."""
    single = isinstance(inputs, torch.Tensor)
    inputs = [inputs] if single else list(inputs)
    retain, batched = _SEVERAL_SEEDS.get()
    grads = gradients(outputs, inputs, seed, allow_unused=True, retain_graph=retain or None, is_grads_batched=batched)
    lead = seed.shape[:1] if batched else ()
    grads = tuple(i.new_zeros(*lead, *i.shape) if g is None else g for i, g in zip(inputs, grads))
    return grads[0] if single else grads
