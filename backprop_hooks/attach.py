"""The hook registry: the one place that owns hook plumbing.

``attach(model, {selector: rule(s)})`` puts rules on the modules the selectors pick:

* a type or tuple of types (``nn.ReLU``): modules that are instances of it;
* a string: a glob on the qualified module name (``"features.*"``, ``"layer4"``; the root is ``""``);
* a callable ``(name, module) -> bool``.

Each module call is bracketed by two identity autograd nodes ("gates"): one on the tensors the module
receives, one on the tensors it returns. In the backward pass the output gate records ``grad_output``; the
input gate hands ``grad_input`` and that ``grad_output`` to the rules, which may replace ``grad_input``.
The gates return detached aliases (no copies), so in-place modules (``nn.ReLU(inplace=True)``) and
in-place ops after the module work. A fresh gate per call pairs every ``grad_input`` with its own
``grad_output`` when a module runs several times in one forward pass.

Threads: the rules act on the forward passes of the thread that attached them; the same modules run by
other threads meanwhile (a serving loop, another explanation of a model that shares a backbone) see no
rule and are not recorded. Neither does a forward pass that activation checkpointing runs again inside the
backward pass (any thread): the rules' nodes keep what they need (see :mod:`backprop_hooks.checkpointing`).
Names are those of the original model, also for a ``torch.compile``d model
(no ``_orig_mod``); a compiled graph does not run hooks added after it was traced, so run a compiled
model's rules on its eager forward (:func:`backprop_hooks.runtime.eager_call`), as the methods do.

Removing a handle releases its rules and their per-call state (the graph and the rules' captures would
otherwise keep each other alive); run the backward pass while the rules are attached: a backward through a
graph recorded under rules that have since been removed raises :class:`RuleError`.
"""

from __future__ import annotations

import threading
import weakref
from fnmatch import fnmatchcase
from types import SimpleNamespace
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .checkpointing import recomputing
from .errors import RuleError, SelectorError, choices, mark_from_rule
from .rule import Rule
from .runtime import clean_name, named_modules
from .validate import check_model

Selector = Union[type, Tuple[type, ...], str, Callable[[str, nn.Module], bool]]
RuleSpec = Union[Mapping[Selector, Union[Rule, Sequence[Rule]]], Sequence[Tuple[Selector, Union[Rule, Sequence[Rule]]]]]


class _Call:
    """State of one call of a hooked module: per-rule contexts and the recorded ``grad_output``."""

    __slots__ = ("ctxs", "n_args", "arg_index", "n_out", "out_index", "grad_output", "inputs_gated", "__weakref__")

    def __init__(self, n_rules: int):
        self.ctxs = [SimpleNamespace() for _ in range(n_rules)]
        self.grad_output: Optional[Tuple[Optional[torch.Tensor], ...]] = None
        self.inputs_gated = False


class _Gate(torch.autograd.Function):
    """Identity on tensors (detached aliases, no copies) whose backward hands the gradients to ``on_backward``."""

    @staticmethod
    def forward(ctx, on_backward: Callable, *xs: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.on_backward = on_backward
        return tuple(x.detach() for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + tuple(ctx.on_backward(grads))


class _ModuleHook:
    """Forward pre-hook and forward hook of one module, carrying its list of rules."""

    __backprop_hooks__ = True

    def __init__(self, module: nn.Module, rules: List[Rule]):
        self.module = module
        self.rules = rules
        self.gated = any(rule.needs_backward for rule in rules)
        self.calls: List[Optional[_Call]] = []  # stack: a module may (rarely) call itself
        self.live: "weakref.WeakSet[_Call]" = weakref.WeakSet()  # calls whose graph may still exist
        self.thread = threading.get_ident()  # the rules act in the attaching thread only

    def acts(self) -> bool:
        """The rules act on forward passes of the attaching thread, not on a checkpoint's recomputation."""
        return threading.get_ident() == self.thread and not recomputing()

    def pre(self, module: nn.Module, args: Tuple[Any, ...]):
        if not self.acts():
            return None
        if not torch.is_grad_enabled():
            self.calls.append(None)
            return None
        call = _Call(len(self.rules))
        self.calls.append(call)
        self.live.add(call)
        self.before(module, args, call)
        if not self.gated:  # forward-only rules: nothing to pair in backward
            return None
        call.n_args = len(args)
        call.arg_index = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        if not call.arg_index:
            return None
        call.inputs_gated = True
        gated = _Gate.apply(lambda grads: self.input_backward(call, grads), *(args[i] for i in call.arg_index))
        args = list(args)
        for i, g in zip(call.arg_index, gated):
            args[i] = g
        return tuple(args)

    def before(self, module: nn.Module, args: Tuple[Any, ...], call: _Call) -> None:
        """The rules' optional ``before`` (only rules that define one are called)."""
        for rule, ctx in zip(self.rules, call.ctxs):
            if type(rule).before is not Rule.before:
                rule.ctx = ctx
                try:
                    rule.before(module, args)
                except Exception as exc:
                    mark_from_rule(exc)
                    raise

    def post(self, module: nn.Module, args: Tuple[Any, ...], output: Any):
        if not self.acts():
            return None
        call = self.calls.pop() if self.calls else None
        if call is None:
            return None
        for rule, ctx in zip(self.rules, call.ctxs):
            rule.ctx = ctx
            try:
                replaced = rule.forward(module, args, output)
            except Exception as exc:
                mark_from_rule(exc)
                raise
            if replaced is not None:
                output = replaced
        if not self.gated:
            return output
        leaves, spec = tree_flatten(output)
        tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        call.n_out = len(tensors)
        call.out_index = [k for k, i in enumerate(tensors) if leaves[i].requires_grad]
        if not call.out_index:
            return output
        gated = _Gate.apply(
            lambda grads: self.output_backward(call, grads), *(leaves[tensors[k]] for k in call.out_index)
        )
        for k, g in zip(call.out_index, gated):
            leaves[tensors[k]] = g
        return tree_unflatten(leaves, spec)

    def input_backward(self, call: _Call, grads: Tuple[Optional[torch.Tensor], ...]):
        """Gradients reaching the gated inputs: align them with the positional inputs, run the rules."""
        grad_input: List[Optional[torch.Tensor]] = [None] * call.n_args
        for k, i in enumerate(call.arg_index):
            grad_input[i] = grads[k]
        new = self.run_backward(call, tuple(grad_input))
        return tuple(new[i] for i in call.arg_index)

    def output_backward(self, call: _Call, grads: Tuple[Optional[torch.Tensor], ...]):
        """Gradients reaching the gated outputs: record them as ``grad_output`` and pass them on."""
        grad_output: List[Optional[torch.Tensor]] = [None] * call.n_out
        for k, j in enumerate(call.out_index):
            grad_output[j] = grads[k]
        call.grad_output = tuple(grad_output)
        if not call.inputs_gated:  # nothing upstream needs a gradient: still show the rules grad_output
            self.run_backward(call, (None,) * call.n_args)
        return grads

    def release(self) -> None:
        """Drop the rules and every call's state. The autograd graph references the gates' callbacks, and
        the rules' state (captured activations, saved inputs) references the graph: a cycle through C++
        that Python's collector cannot break, so removal breaks it here."""
        for call in list(self.live):
            call.ctxs, call.grad_output = None, None
        self.rules, self.calls = [], []

    def run_backward(self, call: _Call, grad_input: Tuple[Optional[torch.Tensor], ...]):
        if call.ctxs is None:
            raise RuleError(
                f"backward pass through {type(self.module).__name__} after its rules were removed: run the "
                "backward pass inside the `with bh.attach(...)` block (or before handle.remove())"
            )
        grad_output = call.grad_output if call.grad_output is not None else (None,) * call.n_out
        for rule, ctx in zip(self.rules, call.ctxs):
            rule.ctx = ctx
            new = rule.backward(self.module, grad_input, grad_output)
            if new is None:
                continue
            new = tuple(new) if isinstance(new, (tuple, list)) else (new,)
            if len(new) != len(grad_input):
                raise RuleError(
                    f"{type(rule).__name__}.backward on {type(self.module).__name__} returned {len(new)} "
                    f"gradient(s); it must return a tuple of {len(grad_input)} (one per positional input) or None"
                )
            grad_input = new
        return grad_input


class Handle:
    """The hooks of one ``attach`` call. ``remove()`` (or leaving the ``with`` block) takes them all off."""

    def __init__(self, model: nn.Module, placed: List[Tuple[str, _ModuleHook, list]]):
        self.model = model
        self._placed = placed

    @property
    def modules(self) -> dict:
        """Qualified module name -> the rules on it, in the order they run."""
        out: dict = {}
        for name, hook, _ in self._placed:
            out.setdefault(name, []).extend(hook.rules)
        return out

    @property
    def linear(self) -> bool:
        """True when every attached rule is linear in the incoming gradient."""
        return all(rule.linear for _, hook, _ in self._placed for rule in hook.rules)

    def remove(self) -> None:
        for _, hook, handles in self._placed:
            for h in handles:
                h.remove()
            hook.release()
        self._placed = []

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Handle({len(self._placed)} modules)"


def _matches(selector: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, type) or (isinstance(selector, tuple) and all(isinstance(s, type) for s in selector)):
        return isinstance(module, selector)
    if isinstance(selector, str):
        return fnmatchcase(name, clean_name(selector))
    if callable(selector):
        return bool(selector(name, module))
    raise SelectorError(
        f"selector {selector!r} is neither a module type, a name glob (str) nor a callable (name, module) -> bool"
    )


def _as_rules(selector: Selector, value: Any) -> List[Rule]:
    rules = [value] if isinstance(value, Rule) else list(value) if isinstance(value, (list, tuple)) else None
    if not rules or not all(isinstance(r, Rule) for r in rules):
        raise RuleError(f"selector {selector!r} maps to {value!r}; expected a Rule or a list of Rules")
    return rules


def _items(rules: RuleSpec) -> Iterable[Tuple[Selector, Any]]:
    return rules.items() if isinstance(rules, Mapping) else rules


def _describe(model: nn.Module) -> str:
    names = [n for n, _ in named_modules(model) if n][:8]
    types = sorted({type(m).__name__ for m in model.modules()})
    return f"module names look like {choices(names, 8)}; module types present: {choices(types, 10)}"


def attach(model: nn.Module, rules: RuleSpec) -> Handle:
    """Attach rules to the modules of ``model`` picked by selectors; returns a removable :class:`Handle`.

    Several rules on one module run in the order given (forward and backward alike). A selector that
    matches no module raises :class:`~backprop_hooks.errors.SelectorError`; nothing is attached then.
    """
    check_model(model, "attach needs")
    named = named_modules(model)
    names = {id(module): name for name, module in named}
    per_module: dict = {}
    parts: List[Tuple[str, nn.Module, List[Rule]]] = []
    for selector, value in _items(rules):
        chosen = _as_rules(selector, value)
        hits = [(name, module) for name, module in named if _matches(selector, name, module)]
        if not hits:
            raise SelectorError(
                f"selector {selector!r} matches no module of {type(model).__name__}; {_describe(model)}"
            )
        for name, module in hits:
            for rule in chosen:
                rule.check(module)
                for child, helper in rule.parts(module):
                    helper.check(child)
                    parts.append((names.get(id(child), f"{name}.<part>"), child, [helper]))
            per_module.setdefault(id(module), (name, module, []))[2].extend(chosen)
    placed = []
    for name, module, module_rules in list(per_module.values()) + parts:
        hook = _ModuleHook(module, module_rules)
        handles = [module.register_forward_pre_hook(hook.pre), module.register_forward_hook(hook.post)]
        placed.append((name, hook, handles))
    return Handle(model, placed)


def is_framework_hook(fn: Any) -> bool:
    """True for hook functions placed by :func:`attach` (used by ``testing.assert_no_hooks_left``)."""
    return getattr(getattr(fn, "__self__", None), "__backprop_hooks__", False)
