r"""Targets: what is explained, as a seed on the logits.

Every target maps ``(logits[B,C], classes[B]) -> seed[B,C]``, the vector fed into the vector-Jacobian
product at the logits. For a method linear in the seed, the explanation of an objective ``f(y)`` is the
explanation of ``v = ∂f/∂y``, so a contrast costs one backward pass, never one per class.

=============  ===================================  ==========================================
name           objective                            seed ``v``
=============  ===================================  ==========================================
logit          ``y_t``                              ``e_t``
softmax        ``p_t``                              ``p_t (e_t - p)``
log_softmax    ``log p_t``                          ``e_t - p``
weighted       ``y_t - Σ_{s≠t} α_s y_s``            ``e_t - α``, ``α = softmax(y with y_t=-inf)``
mean           ``y_t - mean_{s≠t} y_s``             ``e_t - (1 - e_t)/(C-1)``
max            ``y_t - y_{s*}``                     ``e_t - e_{s*}``, ``s* = argmax_{s≠t} y_s``
Versus(s)      ``y_t - y_s``                        ``e_t - e_s``
=============  ===================================  ==========================================

``objective(logits, classes)`` returns the per-sample objective (``α`` and ``s*`` held constant); its
gradient with respect to the logits is the seed, which the property tests check.

Potentials. Every seed is also the gradient of a true scalar, ``potential(logits, classes) -> (B,)``, the value
that perturbation methods, Captum's convergence deltas and Integrated Gradients' completeness are measured
against:

=============  =========================================================================
name           potential
=============  =========================================================================
logit          ``y_t``
softmax        ``p_t``
log_softmax    ``log p_t``
weighted       the log-odds ``log(p_t / (1 − p_t)) = y_t − logsumexp_{s≠t} y_s`` (nothing held)
mean           ``y_t − mean_{s≠t} y_s``
max            ``y_t − y_{s*}`` (``s*`` held: the potential is piecewise linear)
Versus(s)      ``y_t − y_s``
=============  =========================================================================

The weighted seed ``e_t − α`` is exactly the gradient of the log-odds, ``α`` included: ``∂/∂y_s
logsumexp_{r≠t} y_r = α_s``. The same fact gives ``φ(p_t) = p_t (1 − p_t) φ_weighted``, since
``p_t = sigmoid(log-odds)``.

The identities. Write ``φ_s`` for the logit explanation of class ``s``. For a method whose backward is
linear in the seed (``Explanation.linear``), exactly:

* ``φ_weighted = φ_t − Σ_{s≠t} α_s φ_s``; ``φ_mean``, ``φ_max`` and ``φ_versus`` are the same combinations
  with their own weights;
* ``φ(p_t) = p_t (1 − p_t) φ_weighted`` and ``φ(log p_t) = (1 − p_t) φ_weighted``.

Methods that are not linear in the seed (guided backprop, deconvnet, ``relu=True`` CAMs, FullGrad with
``abs``, rollouts, pointwise SmoothGrad/IG) still back-propagate the contrast seed, but the identities do
not hold; they emit :class:`~backprop_hooks.errors.NonLinearContrastWarning`.
"""

from __future__ import annotations

from typing import Dict, Type, Union

import torch
import torch.nn.functional as F

from .errors import ClassIndexError, UnknownNameError, choices
from .validate import check_classes


def _onehot(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return F.one_hot(classes, logits.shape[1]).to(logits.dtype)


def _pick(values: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return values.gather(1, classes[:, None]).squeeze(1)


def _others_softmax(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """α: softmax over the logits with class t masked out (stable when p_t → 1)."""
    masked = logits.scatter(1, classes[:, None], float("-inf"))
    return masked.softmax(dim=1)


def _runner_up(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return logits.scatter(1, classes[:, None], float("-inf")).argmax(dim=1)


class Target:
    """A target: ``seed(logits, classes)``, the ``objective`` it is the gradient of (weights held constant),
    and its ``potential``, the true scalar whose gradient it is."""

    name: str = "target"
    contrastive: bool = True  # compares t with other classes (False only for the plain logit)
    min_classes: int = 2

    def seed(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B, C) the seed ``v`` fed into the backward pass at the logits ``(B, C)`` for the classes ``(B,)``."""
        raise NotImplementedError

    def objective(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B,) the objective whose gradient with respect to the logits is :meth:`seed`, with the target's
        weights (``α``, ``s*``) held constant."""
        raise NotImplementedError

    def potential(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B,) the scalar whose gradient with respect to the logits is :meth:`~Target.seed`, nothing held but
        what the target itself holds (``s*`` of ``max``). Differentiable; computed stably (log-sum-exp,
        log-softmax)."""
        raise NotImplementedError(f"{type(self).__name__} defines no potential")

    def potentials(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C): column ``c`` is :meth:`~Target.potential` with class ``c`` for every sample (for
        ``weighted``, the log-odds of every class). Built-in targets compute it in O(B·C); this default
        evaluates the potential of each class on a (B·C, C) stack."""
        b, c = logits.shape
        stacked = logits.unsqueeze(1).expand(b, c, c).reshape(b * c, c)
        classes = torch.arange(c, device=logits.device).repeat(b)
        return self.potential(stacked, classes).view(b, c)

    def check_explained(self, logits: torch.Tensor, classes: torch.Tensor) -> None:
        """Refuse ``classes`` the target cannot explain at ``logits`` (``Versus``: a class against itself)."""

    def check(self, num_classes: int) -> None:
        """Raise :class:`~backprop_hooks.errors.ClassIndexError` when a model with ``num_classes`` classes has
        too few for this target (a contrast needs two)."""
        if num_classes < self.min_classes:
            raise ClassIndexError(
                f"target {self.name!r} needs at least {self.min_classes} classes; the model has {num_classes}"
            )

    @property
    def key(self) -> str:
        """The canonical name, which :func:`get` turns back into this target: ``"weighted"``, ``"versus:281"``."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(type(self))


class Logit(Target):
    """The logit of class t, ``y_t`` (the "original" explanation): seed ``e_t``; not a contrast."""

    name, contrastive, min_classes = "logit", False, 1

    def seed(self, logits, classes):
        return _onehot(logits, classes)

    def objective(self, logits, classes):
        return _pick(logits, classes)

    def potential(self, logits, classes):
        return _pick(logits, classes)

    def potentials(self, logits):
        return logits


class Softmax(Target):
    """The probability ``p_t``: seed ``p_t (e_t − p)``; its potential is ``p_t`` itself."""

    name, contrastive, min_classes = "softmax", True, 1

    def seed(self, logits, classes):
        p = logits.softmax(dim=1)
        return _pick(p, classes)[:, None] * (_onehot(logits, classes) - p)

    def objective(self, logits, classes):
        return _pick(logits.softmax(dim=1), classes)

    def potential(self, logits, classes):
        return _pick(logits.log_softmax(dim=1), classes).exp()

    def potentials(self, logits):
        return logits.softmax(dim=1)


class LogSoftmax(Target):
    """The log-probability ``log p_t``: seed ``e_t − p``; its potential is ``log p_t`` itself."""

    name, contrastive, min_classes = "log_softmax", True, 1

    def seed(self, logits, classes):
        return _onehot(logits, classes) - logits.softmax(dim=1)

    def objective(self, logits, classes):
        return _pick(logits.log_softmax(dim=1), classes)

    def potential(self, logits, classes):
        return _pick(logits.log_softmax(dim=1), classes)

    def potentials(self, logits):
        return logits.log_softmax(dim=1)


class Weighted(Target):
    """The paper's weighted contrast: ``y_t − Σ_{s≠t} α_s y_s`` with ``α_s = p_s / (1 − p_t)``; its potential is
    the log-odds ``log(p_t / (1 − p_t))``."""

    name = "weighted"

    def seed(self, logits, classes):
        return _onehot(logits, classes) - _others_softmax(logits, classes)

    def objective(self, logits, classes):
        alpha = _others_softmax(logits.detach(), classes)
        return _pick(logits, classes) - (alpha * logits).sum(dim=1)

    def potential(self, logits, classes):
        masked = logits.scatter(1, classes[:, None], float("-inf"))
        return _pick(logits, classes) - masked.logsumexp(dim=1)

    def potentials(self, logits):
        # logsumexp over s ≠ c for every c: the exp-sum relative to the maximum minus the class's own term (no
        # cancellation, the maximum stays in the sum); for the argmax itself, the logsumexp with it masked
        top = logits.argmax(dim=1, keepdim=True)
        y_max = logits.gather(1, top)
        shifted = (logits - y_max).exp()
        others = y_max + (shifted.sum(dim=1, keepdim=True) - shifted).log()
        others = others.scatter(1, top, logits.scatter(1, top, float("-inf")).logsumexp(dim=1, keepdim=True))
        return logits - others


class MeanContrast(Target):
    """t against the mean of the others: ``y_t − mean_{s≠t} y_s``, seed ``e_t − (1 − e_t)/(C − 1)`` (linear)."""

    name = "mean"

    def seed(self, logits, classes):
        onehot = _onehot(logits, classes)
        return onehot - (1 - onehot) / (logits.shape[1] - 1)

    def objective(self, logits, classes):
        c = logits.shape[1]
        y_t = _pick(logits, classes)
        return y_t - (logits.sum(dim=1) - y_t) / (c - 1)

    def potential(self, logits, classes):
        return self.objective(logits, classes)

    def potentials(self, logits):
        return logits - (logits.sum(dim=1, keepdim=True) - logits) / (logits.shape[1] - 1)


class MaxContrast(Target):
    """t against the runner-up: ``y_t − y_{s*}`` with ``s* = argmax_{s≠t} y_s``, seed ``e_t − e_{s*}``; the
    potential holds ``s*``, so it is piecewise linear."""

    name = "max"

    def seed(self, logits, classes):
        return _onehot(logits, classes) - _onehot(logits, _runner_up(logits, classes))

    def objective(self, logits, classes):
        return _pick(logits, classes) - _pick(logits, _runner_up(logits.detach(), classes))

    def potential(self, logits, classes):
        return self.objective(logits, classes)

    def potentials(self, logits):
        top2 = logits.topk(2, dim=1)
        best, second = top2.values[:, :1], top2.values[:, 1:]
        is_top = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top2.indices[:, :1], True)
        return logits - torch.where(is_top, second, best)


class Versus(Target):
    """ "Why t and not s": ``y_t − y_s`` for a fixed class ``s`` (int, or a (B,) tensor of classes)."""

    name = "versus"

    def __init__(self, other: Union[int, torch.Tensor]):
        self.other = other

    def _other(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return check_classes(self.other, logits, what="Versus class")

    def check_explained(self, logits, classes):
        """A sample whose foil ``s`` is its own class ``t`` (``y_t − y_t = 0``, an empty map) is a
        :class:`ClassIndexError` (one host synchronisation)."""
        same = self._other(logits, classes) == classes
        if bool(same.any()):
            rows = same.nonzero().flatten()
            raise ClassIndexError(
                f"Versus: samples {rows.tolist()[:10]} explain classes {classes[rows].tolist()[:10]} against "
                "themselves (y_t - y_t = 0, an empty map); pick a foil other than the explained class, or "
                "target='max' (the runner-up)"
            )

    def seed(self, logits, classes):
        return _onehot(logits, classes) - _onehot(logits, self._other(logits, classes))

    def objective(self, logits, classes):
        return _pick(logits, classes) - _pick(logits, self._other(logits, classes))

    def potential(self, logits, classes):
        return self.objective(logits, classes)

    def potentials(self, logits):
        return logits - _pick(logits, self._other(logits, None))[:, None]

    @property
    def key(self) -> str:
        if isinstance(self.other, torch.Tensor) and self.other.numel() != 1:
            raise ClassIndexError("a Versus target with one class per sample has no name; give one class: Versus(281)")
        return f"versus:{int(self.other)}"

    def __repr__(self) -> str:
        return f"Versus({self.other!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Versus) and self.other is other.other

    def __hash__(self) -> int:
        return hash((Versus, id(self.other)))


TARGETS: Dict[str, Type[Target]] = {
    t.name: t for t in (Logit, Softmax, LogSoftmax, Weighted, MeanContrast, MaxContrast)
}


def names() -> list:
    """Target names usable as strings (plus ``"versus:S"`` for ``Versus(S)``)."""
    return list(TARGETS)


def get(target: Union[str, Target]) -> Target:
    """A target from its name (``"weighted"``, ``"versus:281"``) or a :class:`Target` instance."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        key = target.strip().lower()
        if key in TARGETS:
            return TARGETS[key]()
        if key.startswith("versus:") and key[7:].isdigit():
            return Versus(int(key[7:]))
    raise UnknownNameError(f"unknown target {target!r}; accepted: {choices(names())}, 'versus:S' or a Target instance")
