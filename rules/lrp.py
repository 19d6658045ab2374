r"""Layer-wise relevance propagation (LRP) as backward rules on Linear and Conv1d/2d/3d layers (and Hugging
Face's ``Conv1D``, GPT-2's linear layer).

Formulation ("modified gradient"). What flows backwards is a gradient-like quantity ``g``; the relevance
of any tensor ``t`` of the network is ``R_t = t ⊙ g_t``. Everything without a rule keeps its ordinary
gradient, which is already the right relevance redistribution for it:

* ReLU (and any elementwise gating): ``g·1[z>0]`` gives ``R_z = relu(z) ⊙ g = R_out``: relevance passes;
* max pooling: ``g`` goes to the winner, whose value is the pooled value: winner-take-all;
* average pooling, residual additions, concatenation, reshapes: ``R_i = a_i ⊙ g`` splits the output
  relevance in proportion to each input's contribution ``a_i`` (the LRP-0 / z-rule with no stabiliser;
  at an addition ``a + b`` the branches get ``a ⊙ g`` and ``b ⊙ g``, which sum to the output relevance
  but can both be large when ``a`` and ``b`` nearly cancel).

A rule on a layer ``z = W x + b`` receives ``g_out``, forms the output relevance ``R = z ⊙ g_out`` and
redistributes it by its *terms*: each term ``m`` has an input ``x_m`` (``x``, ``x⁺``, ``x⁻`` or a constant),
modified parameters ``(W_m, b_m)``, and output ``z_m = W_m x_m + b_m``. Terms are grouped; per group ``G``

    s_G = scale_G · mask_G(z) ⊙ R / stab(Σ_{m∈G} sign_m z_m),     R_in = Σ_G Σ_{m∈G} sign_m · x_m ⊙ W_mᵀ s_G

and the rule returns ``g_in = R_in / x`` (computed without dividing: ``x⁺ = x ⊙ 1[x>0]`` etc.). On the
*input layer* (``input_layer=True``) it returns ``R_in`` itself, so the gradient at the model's input is
the relevance (rules whose input is a constant — Flat, WSquare, ZBox — exist only there).

``stab(z) = z + ε·sign(z)`` with ``sign(0) = +1``. Every rule is **linear** in ``g_out``: the forward
quantities ``z``, ``z_m``, masks and stabilised denominators are fixed, and ``R`` is linear in ``g_out``.
So back-propagating a contrast seed gives the contrastive LRP family and the identities of
:mod:`backprop_hooks.targets` hold exactly. (With a seed ``v`` at the logits ``y`` the relevance there is
``y ⊙ v``: ``y_t`` for the logit target.)

BatchNorm: a rule built with ``bn=MergeBatchNorm()`` (see :mod:`backprop_hooks.rules.canonizers`) uses the merged
weights ``W·s, (b − μ)·s + β`` when its output feeds an eval-mode BatchNorm directly.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from backprop_hooks.errors import OptionError, RuleError
from backprop_hooks.module_weights import module_tensor
from backprop_hooks.rule import Rule

from .canonizers import bn_affine, merged_params
from .layers import CONV_TYPES, LAYER_TYPES, check_layer, is_hf_conv1d, layer_forward, layer_vjp
from .lrp_terms import (
    Group,
    Modifier,
    Stabiliser,
    Term,
    add_gamma,
    has_negative,
    keep,
    negative,
    negative_part_mask,
    ones,
    positive,
    positive_part_mask,
    square,
    stabilise,
)

Tensor = torch.Tensor


class _Detour(torch.autograd.Function):
    """The layer's output, reconnected to its input by a backward that returns zeros; the
    rule's ``backward`` then supplies the real gradient. The layer's own input gradient, which the rule
    replaces anyway, is never computed, and the layer's saved tensors are freed at once. Parameters get
    no gradient through a layer with an LRP rule."""

    @staticmethod
    def forward(ctx, x: Tensor, output: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.meta = (x.shape, x.dtype, x.device)
        return output.detach()

    @staticmethod
    def backward(ctx, grad: Optional[Tensor]):
        shape, dtype, device = ctx.meta
        return torch.zeros((), dtype=dtype, device=device).expand(shape), None


class LRPRule(Rule):
    """Base LRP rule: subclasses only declare their ``groups`` (terms with weight/bias modifiers) and a
    stabiliser. See the module docstring for the formula."""

    linear = True
    constant_inputs = False  # True when a term's input is a constant (only valid on the input layer)

    def __init__(self, stabilizer: Stabiliser = 1e-6, input_layer: Optional[bool] = None, bn: Optional[Rule] = None):
        self.stabilizer = stabilizer
        self.input_layer = (
            self.constant_inputs if input_layer is None else input_layer
        )  # default: rules with constant inputs sit on the input layer
        self.bn = bn

    def groups(self) -> Sequence[Group]:
        raise NotImplementedError

    def constant(self, name: str, x: Tensor) -> Tensor:
        """The value of a constant input (``"ones"``, ``"low"``, ``"high"``), shaped like ``x``."""
        if name == "ones":
            return torch.ones_like(x)
        raise RuleError(f"{type(self).__name__} has no constant input {name!r}")

    def check(self, module: nn.Module) -> None:
        check_layer(self, module)
        if self.constant_inputs and not self.input_layer:
            raise RuleError(
                f"{type(self).__name__} redistributes relevance independently of the layer's input, so it can only "
                "be the input layer's rule: use input_layer=True (composites do this for the first layer)"
            )

    # -- forward: remember the input and output (in-place changes to them are detected in backward) -----
    def forward(self, module, inputs, output):
        x = inputs[0]
        self.ctx.x, self.ctx.x_version = x.detach(), x._version
        self.ctx.z, self.ctx.z_version = output.detach(), output._version
        self.ctx.link = self.bn.offer(output) if self.bn is not None else None
        self.ctx.negative = has_negative(x)  # x ≥ 0 (after a ReLU): the x⁻ terms vanish, skipped in backward
        if not x.requires_grad:
            return None
        # No copy of the output is kept: when a later in-place op (a ReLU(inplace=True)) changes it,
        # backward recomputes it from x. Copies would cost a second set of activations.
        return _Detour.apply(x, output)

    def params(self, module: nn.Module) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """Effective ``(W, b, z)`` of the layer: merged with a following BatchNorm when there is one.
        ``z`` is the forward's own output unless an in-place op changed it since (then it is recomputed)."""
        ctx = self.ctx
        weight, bias = module_tensor(module, "weight"), module_tensor(module, "bias")  # offloaded ones too
        bn = ctx.link.bn if ctx.link is not None else None
        if bn is not None:
            weight, bias = merged_params(weight, bias, bn)
        z = ctx.z
        if z._version != ctx.z_version:  # e.g. a ReLU(inplace=True) right after the layer
            return weight, bias, layer_forward(module, ctx.x, weight, bias)
        if bn is not None:  # bn(z) = s·z + c per channel (dim 1)
            scale, shift = bn_affine(bn)
            shape = (-1,) + (1,) * (z.dim() - 2)
            z = torch.addcmul(shift.to(z.dtype).view(shape), z, scale.to(z.dtype).view(shape))
        return weight, bias, z

    def term_input(self, term: Term, x: Tensor, constants: dict) -> Tensor:
        """``x``, ``x⁺``, ``x⁻`` (computed when asked: cheap, and not held) or a constant, shaped like ``x``."""
        if term.input in constants:
            return constants[term.input]
        if term.input == "x":
            return x
        if term.input == "pos":
            return x.clamp(min=0)
        if term.input == "neg":
            return x.clamp(max=0)
        constants[term.input] = self.constant(term.input, x)
        return constants[term.input]

    def term_output(self, term: Term, module: nn.Module, x: Tensor, weight: Tensor, bias, constants: dict) -> Tensor:
        """``z_m = W_m x_m + b_m``; for the constant input ``"ones"``, the same for every sample: computed for one
        and expanded (a read-only view)."""
        b_m = None if term.bias is None or bias is None else term.bias(bias)
        w_m = self.modified(term.weight, weight, constants)
        if term.input == "ones":
            one = torch.ones((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            z_m = layer_forward(module, one, w_m, b_m)
            return z_m.expand((x.shape[0],) + tuple(z_m.shape[1:]))
        return layer_forward(module, self.term_input(term, x, constants), w_m, b_m)

    @staticmethod
    def modified(modifier: Modifier, weight: Tensor, cache: dict) -> Tensor:
        """``modifier(weight)``, made once per backward call (``cache``: that call's dict)."""
        if modifier is keep:
            return weight
        if modifier not in cache:
            cache[modifier] = modifier(weight)
        return cache[modifier]

    def term_vjp(self, term: Term, module: nn.Module, x: Tensor, weight: Tensor, s: Tensor, cache: dict) -> Tensor:
        """``W_mᵀ s`` shaped like ``x``. All-ones weights (Flat) connect every output channel to every input
        channel alike: ``Wᵀ s`` is the channel sum of ``s`` spread back by a one-channel kernel, expanded to
        every input channel (a read-only view)."""
        if term.weight is ones and getattr(module, "groups", 1) == 1:
            if isinstance(module, nn.Linear) or is_hf_conv1d(module):
                return s.sum(-1, keepdim=True).expand(x.shape)
            kernel = torch.ones((1, 1) + tuple(module.weight.shape[2:]), dtype=s.dtype, device=s.device)
            return layer_vjp(module, x[:, :1], kernel, s.sum(1, keepdim=True)).expand(x.shape)
        return layer_vjp(module, x, self.modified(term.weight, weight, cache), s)

    def share(
        self,
        group: Group,
        module: nn.Module,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        z: Tensor,
        g_out: Tensor,
        constants: dict,
    ) -> Tensor:
        """``s_G = scale · mask(z) ⊙ z ⊙ g_out / stab(Σ sign_m z_m)`` (``z ⊙ g_out`` is the output relevance):
        what each output unit hands down per unit of contribution. The ``z_m`` are summed as they are made and
        the fresh tensors are updated in place, so a layer adds few output-sized tensors at a time."""
        denom, owned = None, False  # owned: denom is a fresh tensor this loop may update in place
        for term in group.terms:
            if (term.input, term.weight, term.bias) == ("x", keep, keep):
                z_m, fresh = z, False
            else:
                z_m = self.term_output(term, module, x, weight, bias, constants)
                fresh = term.input != "ones"
            if term.sign != 1.0:
                z_m, fresh = z_m * term.sign, True
            if denom is None:
                denom, owned = z_m, fresh
            elif owned:
                denom.add_(z_m)
            else:
                denom, owned = denom + z_m, True
            del z_m
        s = stabilise(denom, self.stabilizer)
        del denom
        s = torch.div(z, s, out=s) if not callable(self.stabilizer) else z / s  # a callable may return its input
        if group.where is not None:
            s.mul_(positive_part_mask(z) if group.where == "pos" else negative_part_mask(z))
        if group.scale != 1.0:
            s.mul_(group.scale)
        return s.mul_(g_out)

    def backward(self, module, grad_input, grad_output):
        g_out = grad_output[0]
        if g_out is None or grad_input[0] is None:
            return None
        x = self.ctx.x
        if x is None:
            raise RuleError(
                f"{type(self).__name__} on {type(module).__name__} ran backward a second time over the same forward: "
                "LRP rules "
                "release the tensors they keep from forward once their backward has run (as autograd does without "
                "retain_graph); run the forward again"
            )
        if x._version != self.ctx.x_version:
            raise RuleError(
                f"{type(self).__name__}: the input of {type(module).__name__} was modified in place after the layer ran"
            )
        weight, bias, z = self.params(module)
        self.ctx.x = self.ctx.z = (
            None  # freed as we go, like autograd's saved tensors: peak memory stays near a plain backward
        )
        nonnegative = not self.ctx.negative()
        constants: dict = {"pos": x} if nonnegative else {}  # x ≥ 0: x⁺ = x
        groups = [g for g in (self.active(group, nonnegative) for group in self.groups()) if g is not None]
        # every group's s first, so that z is freed before the vector-Jacobian products
        shares = [self.share(group, module, x, weight, bias, z, g_out, constants) for group in groups]
        del z
        grad: Optional[Tensor] = None
        const: Optional[Tensor] = None
        for group in groups:
            s = shares.pop(0)
            for term in group.terms:  # modified weights: made once per call (constants), dropped when it returns
                v = self.term_vjp(term, module, x, weight, s, constants)
                if term.input in ("x", "pos", "neg"):  # a fresh tensor: scaled, masked and accumulated in place
                    if term.sign != 1.0:
                        v.mul_(term.sign)
                    if term.input != "x":  # x± = x ⊙ 1[±x > 0]
                        v.mul_(positive_part_mask(x) if term.input == "pos" else negative_part_mask(x))
                    grad = v if grad is None else grad.add_(v)
                else:  # a constant input c: (W_mᵀ s) ⊙ c (v may be a read-only view: no in-place updates)
                    if term.sign != 1.0:
                        v = v * term.sign
                    if term.input != "ones":
                        v = v * self.term_input(term, x, constants)
                    const = v if const is None else const + v
            del s
        if not self.input_layer:
            return (grad if grad is not None else torch.zeros_like(x),) + tuple(grad_input[1:])
        if grad is None:  # only constant inputs (Flat, w²): the relevance is their part alone
            grad = const.contiguous() if const is not None else torch.zeros_like(x)
        else:
            grad.mul_(x)
            if const is not None:
                grad.add_(const)
        return (grad,) + tuple(grad_input[1:])

    @staticmethod
    def active(group: Group, nonnegative: bool) -> Optional[Group]:
        """``group`` without its ``x⁻`` terms when the layer's input has no negative entry (they are exactly
        zero: ``W x⁻ = 0`` and their share is masked by ``1[x < 0]``); None when nothing is left."""
        if not nonnegative:
            return group
        terms = tuple(term for term in group.terms if term.input != "neg")
        if len(terms) == len(group.terms):
            return group
        return Group(terms, group.scale, group.where) if terms else None


class Epsilon(LRPRule):
    r"""LRP-ε: ``R_i = Σ_j x_i w_ij R_j / stab(z_j)``, ``z = Wx + b`` (``epsilon=0`` is LRP-0)."""

    def __init__(self, epsilon: Stabiliser = 1e-6, input_layer: bool = False, bn: Optional[Rule] = None):
        super().__init__(stabilizer=epsilon, input_layer=input_layer, bn=bn)

    @property
    def epsilon(self) -> Stabiliser:
        return self.stabilizer

    def groups(self):
        return (Group((Term("x"),)),)


class ZPlus(LRPRule):
    r"""LRP-z⁺ (α1β0): ``R_i = Σ_j (x_i⁺ w_ij⁺ + x_i⁻ w_ij⁻) R_j / stab(z_j⁺)``,
    ``z⁺ = W⁺x⁺ + b⁺ + W⁻x⁻`` (the sign-aware form; equals the classic z⁺ rule for ``x ≥ 0``)."""

    def groups(self):
        return (Group((Term("pos", positive, positive), Term("neg", negative, None))),)


class AlphaBeta(LRPRule):
    r"""LRP-αβ: ``R_i = Σ_j [α (x⁺w⁺ + x⁻w⁻)_ij / stab(z_j^+) − β (x⁺w⁻ + x⁻w⁺)_ij / stab(z_j^-)] R_j``,
    ``z^+ = W⁺x⁺ + b⁺ + W⁻x⁻``, ``z^- = W⁻x⁺ + b⁻ + W⁺x⁻``; requires ``α − β = 1``, ``α, β ≥ 0``.
    Conserves only where both ``z^+`` and ``z^-`` are non-zero (a unit with ``z^- = 0`` passes ``α R``)."""

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 1.0,
        stabilizer: Stabiliser = 1e-6,
        input_layer: bool = False,
        bn: Optional[Rule] = None,
    ):
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
            raise OptionError(f"AlphaBeta needs alpha, beta >= 0 and alpha - beta = 1; got alpha={alpha}, beta={beta}")
        super().__init__(stabilizer=stabilizer, input_layer=input_layer, bn=bn)
        self.alpha, self.beta = alpha, beta

    def groups(self):
        return (
            Group((Term("pos", positive, positive), Term("neg", negative, None)), scale=self.alpha),
            Group((Term("pos", negative, negative), Term("neg", positive, None)), scale=-self.beta),
        )


class Gamma(LRPRule):
    r"""LRP-γ (generalised to signed inputs and outputs), with ``W^{±γ} = W + γ W^±``:
    for ``z_j > 0``: ``R_i = Σ_j (x⁺ W^{+γ} + x⁻ W^{-γ})_ij R_j / stab(W^{+γ}x⁺ + b + γb⁺ + W^{-γ}x⁻)_j``;
    for ``z_j < 0`` the same with ``+`` and ``−`` swapped. ``γ = 0`` is LRP-0."""

    def __init__(
        self, gamma: float = 0.25, stabilizer: Stabiliser = 1e-6, input_layer: bool = False, bn: Optional[Rule] = None
    ):
        super().__init__(stabilizer=stabilizer, input_layer=input_layer, bn=bn)
        self.gamma = gamma

    def groups(self):
        up = functools.partial(add_gamma, gamma=self.gamma, part=positive)
        down = functools.partial(add_gamma, gamma=self.gamma, part=negative)
        return (
            Group((Term("pos", up, up), Term("neg", down, None)), where="pos"),
            Group((Term("pos", down, down), Term("neg", up, None)), where="neg"),
        )


class Flat(LRPRule):
    r"""Flat (input layer only): ``R_i = Σ_j 1[i ∈ receptive field of j] R_j / stab(n_j)``, ``n_j`` the
    number of inputs of unit ``j`` (all weights and inputs set to one, no bias)."""

    constant_inputs = True

    def groups(self):
        return (Group((Term("ones", ones, None),)),)


class WSquare(LRPRule):
    r"""w² (input layer only): ``R_i = Σ_j w_ij² R_j / stab(Σ_i w_ij² + b_j²)``."""

    constant_inputs = True

    def groups(self):
        return (Group((Term("ones", square, square),)),)


class ZBox(LRPRule):
    r"""z^B (input layer with bounded inputs ``low ≤ x ≤ high``):
    ``R_i = Σ_j (x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻) R_j / stab(Σ_i x_i w_ij − l_i w_ij⁺ − h_i w_ij⁻)_j``
    (biases cancel: ``b − b⁺ − b⁻ = 0``). ``low``/``high``: floats or tensors broadcastable to the input."""

    constant_inputs = True

    def __init__(
        self,
        low: Union[float, Tensor],
        high: Union[float, Tensor],
        stabilizer: Stabiliser = 1e-6,
        input_layer: Optional[bool] = None,
        bn: Optional[Rule] = None,
    ):
        super().__init__(stabilizer=stabilizer, input_layer=input_layer, bn=bn)
        self.low, self.high = low, high

    def constant(self, name, x):
        if name not in ("low", "high"):
            return super().constant(name, x)
        value = torch.as_tensor(getattr(self, name), dtype=x.dtype, device=x.device)
        try:
            return torch.broadcast_to(value, x.shape).contiguous()
        except RuntimeError:
            raise RuleError(
                f"ZBox {name} of shape {tuple(value.shape)} does not broadcast "
                f"to the layer input's shape {tuple(x.shape)}"
            ) from None

    def groups(self):
        return (
            Group((Term("x"), Term("low", positive, positive, sign=-1.0), Term("high", negative, negative, sign=-1.0))),
        )


__all__ = [
    "LRPRule",
    "Term",
    "Group",
    "Epsilon",
    "ZPlus",
    "AlphaBeta",
    "Gamma",
    "Flat",
    "WSquare",
    "ZBox",
    "stabilise",
    "layer_forward",
    "layer_vjp",
    "check_layer",
    "is_hf_conv1d",
    "LAYER_TYPES",
    "CONV_TYPES",
]
