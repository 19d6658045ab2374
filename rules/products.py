r"""Function-level relevance rules: products of two input-dependent tensors, attention calls, softmaxes.

In gradient × input form (relevance of a tensor ``t``: ``R_t = t ⊙ ĝ_t``, ``ĝ`` the gradient with modified
backward rules) a product of two factors that both depend on the explained input, ``z = a·b`` (``a * b``,
``a @ b``, ``torch.bmm``/``mm``, the product in ``torch.baddbmm``/``addmm``, ``torch.einsum`` of two
operands), gives ``R_a + R_b = 2 R_z`` under the plain gradient. The *uniform rule* of AttnLRP (Achtibat et
al., ICML 2024) hands each factor half of ``R_z``: both gradients are halved. Per attention call
``out = softmax(q kᵀ · s + mask) v`` this gives the gradients of ``q``, ``k``, ``v`` scaled by ``1/4``,
``1/4``, ``1/2``, so ``F.scaled_dot_product_attention`` keeps running its fused kernel with the three inputs
wrapped in gradient-scaling identities (the output is bit-identical). A factor that does not depend on the
input (a parameter, a constant, rotary ``cos``/``sin``) is no factor of the product: the other one keeps
its whole gradient.

The softmax keeps its exact gradient: AttnLRP's softmax rule, deep Taylor at the input with the bias term,
``R_in = x ⊙ (R_out − s Σ_j R_out,j)``, is ``x ⊙ Jᵀ ĝ`` with ``R_out = s ⊙ ĝ``. ``softmax="held"`` (CP-LRP,
Ali et al., ICML 2022) holds every softmax constant instead: no gradient reaches ``q`` and ``k``, and ``v``
gets the whole relevance.

Which tensors depend on the input: those whose autograd graph reaches the explained input (walked once per
node, memoised for the call). Everything acts inside ``with ProductRules(x, ...):`` only, through an
:class:`~backprop_hooks.rules.intercept.Intercept` (thread-local); nothing on the model changes. In-place
products of two input-dependent tensors (``a.mul_(b)``) raise a :class:`RuleError`: their gradient cannot be
split.
Inside a module whose backward a module rule replaces (an RMSNorm's ``x * rsqrt(...)``, GPT-2's tanh GELU)
the rules stand aside (:func:`stand_aside`, called by the module rules of
:mod:`backprop_hooks.rules.attnlrp`, which also cut the module's own graph).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from backprop_hooks.errors import OptionError, RuleError, choices

from .attention_maths import _SDPA, _SOFTMAXES, _sdpa_arguments
from .intercept import Handler, Intercept, current

PRODUCT_RULES = ("uniform", "gradient")
SOFTMAX_RULES = ("taylor", "held")

_BINARY_PRODUCTS = {
    torch.mul,
    torch.Tensor.mul,
    torch.Tensor.__mul__,
    torch.Tensor.__rmul__,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.mm,
    torch.Tensor.mm,
}
_BIASED_PRODUCTS = {torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm}  # bias + a @ b
_INPLACE_PRODUCTS = {torch.Tensor.mul_, torch.Tensor.__imul__}
_SDPA_NAMES = ("query", "key", "value")


class ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass (a view, no copy); multiplies the gradient by ``factor`` in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` with its gradient multiplied by ``factor`` (``0``: detached, ``1``: ``t`` itself)."""
    if factor == 1.0:
        return t
    if factor == 0.0:
        return t.detach()
    return ScaleGradient.apply(t, factor)


class InputDependence:
    """Whether a tensor of the forward pass depends on the explained input ``x`` (a leaf that requires grad):
    its autograd graph reaches ``x``. Every graph node is visited at most once per call (memoised)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.memo: Dict[Any, bool] = {}

    def __call__(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            return False
        if t is self.x:
            return True
        return t.grad_fn is not None and self._reaches(t.grad_fn)

    def _leaf(self, node: Any) -> Optional[bool]:
        """For an AccumulateGrad node: is it the input's? ``None`` for any other node."""
        if not hasattr(node, "variable"):
            return None
        return node.variable is self.x

    def _reaches(self, root: Any) -> bool:
        memo = self.memo
        if root in memo:
            return memo[root]
        stack = [(root, iter(root.next_functions))]
        while stack:
            node, edges = stack[-1]
            descend = None
            for child, _ in edges:
                if child is None:
                    continue
                known = memo.get(child)
                if known is None:
                    known = self._leaf(child)
                    if known is not None:
                        memo[child] = known
                if known is True:
                    for n, _ in stack:  # every node on the path reaches x
                        memo[n] = True
                    return True
                if known is None:
                    descend = child
                    break
            if descend is None:
                memo[node] = False
                stack.pop()
            else:
                stack.append((descend, iter(descend.next_functions)))
        return memo[root]


def _replace(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> Tuple[tuple, dict]:
    if len(args) > index:
        args = args[:index] + (value,) + args[index + 1 :]
    else:
        kwargs = dict(kwargs, **{name: value})
    return args, kwargs


class ProductRules:
    """The function-level rules for the forward pass that explains ``x`` (see the module docstring), as a table
    of handlers for one :class:`~backprop_hooks.rules.intercept.Intercept`: ``with ProductRules(x, ...):``.

    ``product``: ``"uniform"`` (AttnLRP: each of two input-dependent factors gets half) or ``"gradient"``
    (both keep their gradient). ``softmax``: ``"taylor"`` (AttnLRP: the exact gradient) or ``"held"``
    (CP-LRP: the softmax output is a constant)."""

    def __init__(self, x: torch.Tensor, product: str = "uniform", softmax: str = "taylor") -> None:
        check_product_rules(product, softmax)
        self.product, self.softmax = product, softmax
        self.depends = InputDependence(x)
        self.intercept = Intercept(self.handlers())

    def handlers(self) -> Dict[Callable, Handler]:
        table: Dict[Callable, Handler] = {_SDPA: self._attention, torch.einsum: self._einsum}
        table.update(dict.fromkeys(_BINARY_PRODUCTS, self._product))
        table.update(dict.fromkeys(_BIASED_PRODUCTS, self._product))
        table.update(dict.fromkeys(_INPLACE_PRODUCTS, self._inplace))
        if self.softmax == "held":
            table.update(dict.fromkeys(_SOFTMAXES, self._held))
        return table

    def __enter__(self) -> "ProductRules":
        self.intercept.__enter__()
        return self

    def __exit__(self, *exc) -> Any:
        self.depends.memo.clear()  # the nodes of the call's graph
        return self.intercept.__exit__(*exc)

    def _halves(self, a: Any, b: Any) -> Tuple[Any, Any]:
        if self.product == "uniform" and self.depends(a) and self.depends(b):
            return scale_gradient(a, 0.5), scale_gradient(b, 0.5)
        return a, b

    def _product(self, func, args: tuple, kwargs: dict):
        """``a * b``, ``a @ b`` (factors: the first two arguments) or ``bias + a @ b`` (the second and third)."""
        i = 1 if func in _BIASED_PRODUCTS else 0
        if len(args) < i + 2 or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        a, b = self._halves(args[i], args[i + 1])
        if a is not args[i]:
            args = args[:i] + (a, b) + args[i + 2 :]
        return func(*args, **kwargs)

    def _inplace(self, func, args: tuple, kwargs: dict):
        if (
            self.product != "gradient"
            and torch.is_grad_enabled()
            and len(args) >= 2
            and self.depends(args[0])
            and self.depends(args[1])
        ):
            raise RuleError(
                "an in-place product of two tensors that both depend on the input (a.mul_(b), a *= b) cannot "
                "split its relevance between the factors; write it out of place (a = a * b)"
            )
        return func(*args, **kwargs)

    def _held(self, func, args: tuple, kwargs: dict):
        out = func(*args, **kwargs)
        return out.detach() if isinstance(out, torch.Tensor) and torch.is_grad_enabled() else out

    def _einsum(self, func, args: tuple, kwargs: dict):
        listed = len(args) == 2 and isinstance(args[1], (list, tuple))
        operands = list(args[1]) if listed else list(args[1:])
        if len(operands) == 2 and torch.is_grad_enabled():
            operands = list(self._halves(*operands))
        return func(args[0], operands, **kwargs)

    def _attention(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        """``softmax(q kᵀ s + mask) v`` as one call: the gradients of q, k, v scaled by the factors of the
        two products (``A = softmax(q kᵀ)``, ``A v``), each split only among its input-dependent factors."""
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        bound = _sdpa_arguments(args, kwargs)
        if bound.get("dropout_p", 0.0):
            raise RuleError(
                f"scaled_dot_product_attention was called with dropout_p={bound['dropout_p']}: put the model in "
                "eval mode (model.eval()) to explain it"
            )
        q, k, v = (bound[name] for name in _SDPA_NAMES)
        if self.softmax == "held":
            factors = (0.0, 0.0, 1.0)
        elif self.product == "gradient":
            factors = (1.0, 1.0, 1.0)
        else:
            dq, dk, dv = self.depends(q), self.depends(k), self.depends(v)
            split_av = 0.5 if (dq or dk) and dv else 1.0
            split_qk = 0.5 if dq and dk else 1.0
            factors = (split_av * split_qk, split_av * split_qk, split_av)
        for index, (name, factor) in enumerate(zip(_SDPA_NAMES, factors)):
            args, kwargs = _replace(args, kwargs, index, name, scale_gradient(bound[name], factor))
        return func(*args, **kwargs)


def stand_aside(step: int) -> None:
    """``+1`` when a module whose backward a module rule owns starts, ``-1`` when it has run: the function-level
    rules active in this thread (if any) leave the calls in between alone."""
    active = current()
    if active is not None:
        active.pause(step)


def check_product_rules(product: str, softmax: str) -> None:
    if product not in PRODUCT_RULES:
        raise OptionError(f"unknown product rule {product!r}; accepted: {choices(PRODUCT_RULES)}")
    if softmax not in SOFTMAX_RULES:
        raise OptionError(f"unknown softmax rule {softmax!r}; accepted: {choices(SOFTMAX_RULES)}")


__all__ = [
    "ProductRules",
    "ScaleGradient",
    "scale_gradient",
    "InputDependence",
    "stand_aside",
    "PRODUCT_RULES",
    "SOFTMAX_RULES",
]
