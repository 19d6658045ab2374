r"""Layer-wise relevance propagation: a composite of LRP rules, one seeded backward, the input gradient.

``φ = relevance at the input`` for the seed ``v`` of the target: the relevance at the logits ``y`` is
``y ⊙ v`` (``y_t`` for the logit target; conserved layer by layer up to biases and stabilisers). The rules
are linear in the back-propagated quantity, so ``φ_weighted = φ_t − Σ_s α_s φ_s`` and the other identities
of :mod:`backprop_hooks.targets` hold: softmax-gradient LRP and the contrastive LRP family come from the
seed alone. See :mod:`backprop_hooks.rules.lrp` (formulation, rules) and
:mod:`backprop_hooks.rules.composites` (which layer gets which rule).
"""

from __future__ import annotations

from typing import Any, List, Union

from backprop_hooks.rules.composites import COMPOSITES, Composite, get_composite

from ..options import constructor_options

from .base import Method, grad, register


@register
class LRP(Method):
    """``bh.explain(model, x, method="lrp", composite="epsilon_plus_flat", target="weighted")``.

    ``composite``: a name (``epsilon``, ``epsilon_plus``, ``epsilon_plus_flat``, ``epsilon_alpha2_beta1``,
    ``epsilon_gamma_box`` with ``low=``/``high=``) or a :class:`~backprop_hooks.rules.composites.Composite`; other
    options (``epsilon``, ``stabilizer``, ``canonize``, ``gamma``...) go to the composite.
    """

    name = "lrp"
    linear = True

    def __init__(
        self, model, composite: Union[str, Composite] = "epsilon_plus_flat", check_finite: bool = True, **options: Any
    ):
        super().__init__(model, check_finite=check_finite)
        self.composite = get_composite(composite, **options)

    @classmethod
    def options(cls) -> List[str]:
        """The method's own options and those of its composites (each composite checks its own)."""
        composites = [o for c in COMPOSITES.values() for o in constructor_options(c, ("self",))]
        return list(dict.fromkeys(super().options() + composites))

    def rules(self, x):
        return self.composite.spec(self.model)

    def attribute(self, x, logits, seed):
        return grad(logits, x, seed)
