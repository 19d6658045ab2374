r"""Input-gradient methods: gradient, input × gradient, SmoothGrad, Integrated Gradients.

SmoothGrad and Integrated Gradients evaluate the gradient at many points (noisy copies, path points);
those points are stacked into one batch, so an explanation is one forward and one backward pass
(``internal_batch_size`` bounds the memory by splitting the stack into chunks).

Seeds at many points. With ``pointwise=False`` (default) the target's seed ``v`` is computed once, on the
explained input, and reused at every point: the method is then linear in the seed and the contrast
identities hold exactly (the weights ``α`` of the weighted contrast are constants, as in the paper); IG's
completeness holds against the linearised objective ``v · y``: ``Σ φ = v · (y(x) − y(x0))``.

With ``pointwise=True`` the seed is recomputed at every point. The seed at a point is the gradient of the
target's *potential* ``P`` there (:meth:`backprop_hooks.targets.Target.potential`), so this is SmoothGrad/IG of
the potential itself, for every target: IG satisfies completeness ``Σ φ = P(x) − P(x0)`` against ``p_t``,
``log p_t``, and, for ``weighted``, the log-odds ``log(p_t / (1 − p_t))`` (``max`` holds ``s*`` per point, so
its potential is only piecewise smooth). Not linear in the seed: the identities do not hold.

``Explanation.extras["potential"]`` is ``P`` at the explained input, (B,).
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import torch

from ..attach import attach
from ..errors import InputError, OptionError
from ..precision import accumulation_dtype, widen
from ..validate import Classes, LogitsFn
from .base import Method, grad, register


@register
class Gradient(Method):
    """``φ = ∂f/∂x`` (saliency without the absolute value)."""

    name = "gradient"

    def attribute(self, x, logits, seed):
        return widen(grad(logits, x, seed))


@register
class InputXGradient(Gradient):
    """``φ = x ⊙ ∂f/∂x``."""

    name = "input_x_gradient"

    def attribute(self, x, logits, seed):
        return widen(x.detach()) * widen(grad(logits, x, seed))  # exact products for half-precision factors


def _potential(target, logits: torch.Tensor, classes: torch.Tensor) -> dict:
    """``{"potential": P(x)}``, or nothing for a user's target that defines no potential."""
    try:
        return {"potential": target.potential(logits, classes)}
    except NotImplementedError:
        return {}


def _chunks(total: int, per_chunk: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, total, per_chunk):
        yield start, min(per_chunk, total - start)


class _ManyPoints(Method):
    """Gradients at K points per sample, stacked as a (K·B) batch: ``points(x) -> (K, B, ...)``."""

    linear = True

    def __init__(
        self, model, pointwise: bool = False, internal_batch_size: Optional[int] = None, check_finite: bool = True
    ):
        super().__init__(model, check_finite=check_finite)
        self.pointwise = pointwise
        self.internal_batch_size = internal_batch_size
        self.linear = not pointwise

    def num_points(self) -> int:
        raise NotImplementedError

    def begin(self, x: torch.Tensor) -> None:
        """Per-explanation state (random generator, quadrature weights)."""

    def points(self, x: torch.Tensor, start: int, k: int) -> torch.Tensor:
        """Points ``start..start+k`` for every sample, shaped (k, B, ...)."""
        raise NotImplementedError

    def combine(self, x: torch.Tensor, grads: torch.Tensor, start: int) -> torch.Tensor:
        """Reduce gradients of points ``start..start+k`` ((k, B, ...)) to a partial sum (B, ...)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, classes: Classes = None, target="logit", logits: Optional[LogitsFn] = None):
        with self.session(logits):
            x, target = self.prepare(x, target)
            batch = x.shape[0]
            spec = self.rules(x)
            self.run = self.runner(spec)
            with torch.no_grad():  # the seed at x, fixed for every point (unless pointwise)
                logits, classes, seed = self.forward(x, classes, target)
            self.begin(x)
            k_total = self.num_points()
            per_chunk = k_total if self.internal_batch_size is None else max(1, self.internal_batch_size // batch)
            total = torch.zeros_like(x, dtype=accumulation_dtype(x.dtype))  # float32 for a half-precision model
            for start, k in _chunks(k_total, per_chunk):
                xs = self.points(x, start, k).to(x.dtype).reshape(k * batch, *x.shape[1:]).detach()
                xs.requires_grad_(True)
                with attach(self.model, self.rules(xs)):
                    out = self.model_logits(xs, samples=batch)
                    if self.pointwise:  # the gradient of the potential at each point
                        s = target.seed(widen(out.detach()), classes.repeat(k))
                    else:
                        s = seed.repeat(k, 1)
                    g = grad(out, xs, s)
                total = total + self.combine(x, g.view(k, batch, *x.shape[1:]), start)
        extras = _potential(target, logits, classes)
        return self.result(total, logits, classes, target, self.linear, x, **extras)


@register
class SmoothGrad(_ManyPoints):
    """``φ = mean_k ∂f/∂x (x + ε_k)``, ``ε_k ~ N(0, σ²)``, ``σ = noise_level · (max x − min x)`` per sample."""

    name = "smoothgrad"
    per_call = ("_sigma", "_gen")

    def __init__(self, model, n_samples: int = 25, noise_level: float = 0.15, seed: Optional[int] = None, **kw):
        super().__init__(model, **kw)
        if n_samples < 1:
            raise OptionError(f"n_samples must be >= 1, got {n_samples}")
        self.n_samples, self.noise_level, self.seed = n_samples, noise_level, seed

    def num_points(self):
        return self.n_samples

    def begin(self, x):
        flat = widen(x.flatten(1))
        self._sigma = (self.noise_level * (flat.amax(1) - flat.amin(1))).view(1, -1, *([1] * (x.dim() - 1)))
        self._gen = None if self.seed is None else torch.Generator(device=x.device).manual_seed(self.seed)

    def points(self, x, start, k):
        noise = torch.randn((k, *x.shape), generator=self._gen, device=x.device, dtype=self._sigma.dtype)
        return x.unsqueeze(0) + self._sigma * noise

    def combine(self, x, grads, start):
        return grads.sum(0, dtype=accumulation_dtype(grads.dtype)) / self.n_samples


def path_rule(quadrature: str, n_steps: int, dtype=torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Path fractions ``a_k`` in [0, 1] and weights ``w_k`` (summing to 1) of a quadrature rule.

    ``riemann_left|right|middle|trapezoid`` or ``gausslegendre`` (Golub–Welsch, mapped to [0, 1]).
    """
    if n_steps < 1:
        raise OptionError(f"n_steps must be >= 1, got {n_steps}")
    k = torch.arange(n_steps, dtype=dtype)
    if quadrature == "riemann_left":
        return k / n_steps, torch.full((n_steps,), 1.0 / n_steps, dtype=dtype)
    if quadrature == "riemann_right":
        return (k + 1) / n_steps, torch.full((n_steps,), 1.0 / n_steps, dtype=dtype)
    if quadrature == "riemann_middle":
        return (k + 0.5) / n_steps, torch.full((n_steps,), 1.0 / n_steps, dtype=dtype)
    if quadrature == "riemann_trapezoid":
        if n_steps < 2:
            raise OptionError("riemann_trapezoid needs n_steps >= 2")
        w = torch.full((n_steps,), 1.0 / (n_steps - 1), dtype=dtype)
        w[0] = w[-1] = 0.5 / (n_steps - 1)
        return k / (n_steps - 1), w
    if quadrature == "gausslegendre":
        beta = (k[1:] / torch.sqrt(4 * k[1:] ** 2 - 1)) if n_steps > 1 else k[:0]
        nodes, vectors = torch.linalg.eigh(torch.diag(beta, 1) + torch.diag(beta, -1))
        return (nodes + 1) / 2, vectors[0] ** 2
    raise OptionError(
        f"unknown quadrature {quadrature!r}; accepted: 'riemann_left', 'riemann_right', 'riemann_middle', "
        "'riemann_trapezoid', 'gausslegendre'"
    )


@register
class IntegratedGradients(_ManyPoints):
    """``φ = (x − x0) ⊙ Σ_k w_k ∂f/∂x (x0 + a_k (x − x0))`` (Sundararajan et al. 2017)."""

    name = "integrated_gradients"
    per_call = ("_alphas", "_weights", "_base")

    def __init__(
        self,
        model,
        n_steps: int = 50,
        baseline: Union[float, torch.Tensor] = 0.0,
        quadrature: str = "gausslegendre",
        **kw,
    ):
        super().__init__(model, **kw)
        self.n_steps, self.baseline, self.quadrature = n_steps, baseline, quadrature
        path_rule(quadrature, n_steps)  # fail early on a bad rule name

    def _baseline(self, x):
        base = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device)
        try:
            return torch.broadcast_to(base, x.shape)
        except RuntimeError:
            raise InputError(
                f"baseline of shape {tuple(base.shape)} does not broadcast to the input's shape {tuple(x.shape)}"
            ) from None

    def num_points(self):
        return self.n_steps

    def begin(self, x):
        alphas, weights = path_rule(self.quadrature, self.n_steps)
        shape, dtype = (-1,) + (1,) * x.dim(), accumulation_dtype(x.dtype)  # float32 for a half-precision model
        self._alphas = alphas.to(device=x.device, dtype=dtype).view(shape)
        self._weights = weights.to(device=x.device, dtype=dtype).view(shape)
        self._base = widen(self._baseline(x))

    def points(self, x, start, k):
        return self._base + self._alphas[start : start + k] * (widen(x) - self._base)

    def combine(self, x, grads, start):
        return (widen(x) - self._base) * (self._weights[start : start + grads.shape[0]] * widen(grads)).sum(0)
