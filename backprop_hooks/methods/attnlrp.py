r"""AttnLRP: layer-wise relevance propagation through transformers (Achtibat et al., ICML 2024).

``φ = x ⊙ ĝ``: the input times the gradient of ``v · y`` (``v`` the target's seed) with the backward rules of
an AttnLRP composite (:mod:`backprop_hooks.rules.attnlrp`): identity rules on norms and activations, the
uniform rule on products of input-dependent tensors (``q kᵀ``, ``A v``, gated MLPs), the softmax's own
gradient (deep Taylor with the bias term), the ε-rule on linear layers. The relevance at the logits is
``y ⊙ v``. Every rule is linear in the back-propagated quantity, so the method is linear in the seed: the
contrast identities hold exactly, and ``weighted``/``max``/``Versus`` over a language model's whole
vocabulary cost one backward pass.
"""

from __future__ import annotations

from typing import Any, List, Union

from backprop_hooks.rules.attnlrp import ATTNLRP_COMPOSITES, AttnLRPComposite, get_attnlrp_composite

from ..options import constructor_options

from ..precision import widen
from .base import Method, grad, register


@register
class AttnLRP(Method):
    """``bh.explain(model, x, "attnlrp", target="weighted")``; ``bh.explain_text(..., method="attnlrp")``.

    ``composite``: ``"attnlrp"`` (default), ``"cp_lrp"`` (attention probabilities held) or an
    :class:`~backprop_hooks.rules.attnlrp.AttnLRPComposite`; other options (``epsilon=``, ``softmax=``,
    ``product=``, ``linear=``, ``conv=``, ...) go to the composite.
    """

    name = "attnlrp"
    linear = True
    intercepts_calls = True

    def __init__(
        self, model, composite: Union[str, AttnLRPComposite] = "attnlrp", check_finite: bool = True, **options: Any
    ):
        super().__init__(model, check_finite=check_finite)
        self.composite = get_attnlrp_composite(composite, **options)

    @classmethod
    def options(cls) -> List[str]:
        """The method's own options and those of its composites (each composite checks its own)."""
        composites = [o for c in ATTNLRP_COMPOSITES.values() for o in constructor_options(c, ("self",))]
        return list(dict.fromkeys(super().options() + composites))

    def rules(self, x):
        return self.composite.spec(self.model)

    def forward_context(self, x):
        return self.composite.functions(x)

    def attribute(self, x, logits, seed):
        return widen(x.detach()) * widen(grad(logits, x, seed))  # exact products for half-precision factors
