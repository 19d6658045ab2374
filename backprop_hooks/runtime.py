"""Where an explanation runs: grad mode, inference tensors, compiled models and threads.

* ``explaining(model)``: the context of one explanation: the model's lock (explanations of one model from
  several threads run one after another; different models run in parallel), gradients enabled and
  inference mode off inside the call only (``torch.no_grad()`` and ``torch.inference_mode()`` outside it
  change nothing).
* ``unwrap(model)``: the module a ``torch.compile(model)`` wrapper holds (``_orig_mod``), so that layer and
  selector names are those of the original model; ``named_modules(model)`` lists modules under those names
  also when compiled submodules sit inside.
* ``eager_call(model, *args)``: the model's eager forward, hooks included, whether it was compiled with
  ``torch.compile(model)``, ``model.compile()``, on a submodule or on ``forward``. A compiled graph does not
  run module hooks added after it was traced, so a method whose rules live in hooks runs the eager model;
  methods without rules (the gradient family) run the compiled graph itself.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator, List, Tuple

import torch
from torch import nn

from .errors import BackpropHooksError, ForwardError, ModelError, raised_by_rule

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_STANCE_LOCK = threading.RLock()  # torch.compiler.set_stance is process-wide: one user at a time

WRAPPER_ATTRIBUTE = "_orig_mod"


def is_wrapper(module: nn.Module) -> bool:
    """True for a ``torch.compile(module)`` wrapper (``OptimizedModule``)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(
        module.__dict__.get("_modules", {}).get(WRAPPER_ATTRIBUTE), nn.Module
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` wrappers (``model`` itself when there is none)."""
    while is_wrapper(model):
        model = model._modules[WRAPPER_ATTRIBUTE]
    return model


def _compiled_forward(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return forward is not None and hasattr(forward, "_torchdynamo_orig_callable")


def _compiled_here(module: nn.Module) -> bool:
    """``module`` itself is a ``torch.compile`` wrapper, was ``.compile()``d, or has a compiled ``forward``."""
    return is_wrapper(module) or module.__dict__.get("_compiled_call_impl") is not None or _compiled_forward(module)


def is_compiled(model: nn.Module) -> bool:
    """True when running ``model`` may run a compiled graph: a ``torch.compile`` wrapper, ``.compile()``,
    a compiled ``forward``, anywhere in the module tree."""
    return any(_compiled_here(m) for m in model.modules())


def clean_name(name: str) -> str:
    """A qualified module name without the ``_orig_mod`` parts that compiled submodules add."""
    if WRAPPER_ATTRIBUTE not in name:
        return name
    return ".".join(part for part in name.split(".") if part != WRAPPER_ATTRIBUTE)


def named_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``model.named_modules()`` under the original names: ``torch.compile`` wrappers are skipped and the
    ``_orig_mod`` parts of names removed (the wrapper of a compiled submodule is not a module of its own)."""
    return [(clean_name(name), module) for name, module in unwrap(model).named_modules() if not is_wrapper(module)]


def eager_call(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run ``model``'s eager forward (module hooks included), never a compiled graph."""
    model = unwrap(model)
    nested = any(_compiled_here(m) for m in model.modules() if m is not model) or _compiled_forward(model)
    if not nested:
        if model.__dict__.get("_compiled_call_impl") is not None:  # model.compile(): its eager call, hooks and all
            return model._call_impl(*args, **kwargs)
        return model(*args, **kwargs)
    with _STANCE_LOCK, torch.compiler.set_stance("force_eager"):
        if model.__dict__.get("_compiled_call_impl") is not None:
            return model._call_impl(*args, **kwargs)
        return model(*args, **kwargs)


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serialises explanations of ``model`` (shared by the model and its compiled wrappers)."""
    model = unwrap(model)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def explaining(model: nn.Module) -> Iterator[None]:
    """One explanation of ``model``: its lock held, gradients on and inference mode off inside only."""
    with model_lock(model), torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def forward_errors(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Turn an exception raised by the model's forward pass on ``x`` into a :class:`ForwardError` that
    names the input. Errors of backprop_hooks itself and anything a rule raised pass unchanged."""
    try:
        yield
    except BackpropHooksError:
        raise
    except Exception as exc:
        if raised_by_rule(exc):
            raise
        raise ForwardError(
            f"{type(unwrap(model)).__name__}'s forward pass failed on the input of shape {tuple(x.shape)}, dtype "
            f"{x.dtype}, device {x.device}: {type(exc).__name__}: {exc}. Give the input the shape, dtype and "
            "device the model takes (e.g. x.to(next(model.parameters())))"
        ) from exc


def usable(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a copy of it out of inference mode (inference tensors cannot enter an autograd graph)."""
    return x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x


def check_parameters(model: nn.Module) -> None:
    """A model whose parameters were created under ``torch.inference_mode()`` cannot be differentiated."""
    for name, p in model.named_parameters():
        if p.is_inference():
            raise ModelError(
                f"parameter {name!r} of {type(model).__name__} is an inference tensor (the model was built or "
                "loaded under torch.inference_mode()); build it outside inference mode, or copy it: "
                "copy.deepcopy(model) outside torch.inference_mode()"
            )
