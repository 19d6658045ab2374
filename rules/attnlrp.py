r"""AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers",
ICML 2024) as rules: which rule each piece of a transformer gets, in one composite users can edit.

Relevance is in gradient × input form: ``R_t = t ⊙ ĝ_t`` for any tensor ``t``, where ``ĝ`` is the gradient
with these rules and the relevance at the logits ``y`` is ``y ⊙ v`` for the seed ``v`` of the target. Every
rule is linear in ``ĝ``, so the method is linear in the seed and every contrast identity holds.

Which rule each piece gets (backward in gradient form, ``g`` the incoming gradient; conservative?):

* LayerNorm: the identity rule on the centred input, ``σ`` held: ``(w⊙g − mean(w⊙g)) / σ``; conserves;
* RMSNorm: the identity rule, ``rms(x)`` held: ``w ⊙ g / rms(x)``; conserves;
* GELU, SiLU, tanh (``f(0) = 0``): the identity rule, ``R_in = R_out``: ``f(x)/x ⊙ g``; conserves;
* products of two input-dependent tensors (``q kᵀ``, ``A v``, a gated MLP's ``a * b``): the uniform rule,
  half of the relevance to each factor: both gradients halved; conserves;
* softmax: deep Taylor at the input with the bias term, ``R_in = x ⊙ (R_out − s Σ_j R_out,j)``: its exact
  gradient; does **not** conserve (the bias term absorbs relevance);
* Linear and Hugging Face ``Conv1D``: the ε-rule, by default ε → 0 (LRP-0): the plain gradient; ε > 0:
  ``Wᵀ(g ⊙ z / (z + ε·sign z))``; conserves up to what the biases absorb (*);
* convolutions (a ViT's patch embedding, a hybrid's CNN stem): the plain gradient, or any CNN LRP rule
  (``conv=``).

(*) up to the relevance the biases absorb. The norm and activation rules cut the module's own graph (its
backward is never computed); products and attention calls are function calls, ruled by
:class:`~backprop_hooks.rules.products.ProductRules` during the explained forward pass;
``nn.MultiheadAttention`` (torchvision's ViT), whose functional core that cannot see into, is recomputed
explicitly by :class:`MultiheadAttentionRule` so that its products are ruled too.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from backprop_hooks.checkpointing import outside_checkpoint
from backprop_hooks.errors import RuleError, UncoveredModuleWarning
from backprop_hooks.rule import Rule

from .attention_maths import _mha_explicit, _straight_through
from .composites import Spec, _members, get_composite
from .gates import GateHeld, is_gated_activation
from .layers import CONV_TYPES, is_hf_conv1d
from .lrp import Epsilon
from .products import ProductRules, check_product_rules, stand_aside
from .vit_relevance import LayerNormHeld, RMSNormHeld, is_rms_norm

RuleFactory = Callable[[], Rule]


class _CutsGraph:
    """Mixin for a held rule that replaces its module's input gradient entirely: the function-level rules stand
    aside while the module runs, and the held rule, on from the start, cuts the module's graph (its backward
    is never computed; see :mod:`backprop_hooks.rules.vit_relevance`)."""

    def before(self, module, inputs):
        stand_aside(+1)
        self.ctx.aside = True

    def forward(self, module, inputs, output):
        if getattr(self.ctx, "aside", False):
            stand_aside(-1)
        return super().forward(module, inputs, output)


class LayerNormRule(_CutsGraph, LayerNormHeld):
    """AttnLRP on ``nn.LayerNorm``: the identity rule on the centred input, ``σ`` held constant."""


class RMSNormRule(_CutsGraph, RMSNormHeld):
    """AttnLRP on an RMSNorm: the identity rule, ``rms(x)`` held constant."""


class IdentityRule(_CutsGraph, GateHeld):
    """AttnLRP's identity rule on an elementwise activation ``f`` with ``f(0) = 0`` (GELU, SiLU, tanh):
    ``R_in = R_out``, i.e. ``ĝ_in = f(x)/x ⊙ ĝ_out`` (``at_zero``: the limit at ``x = 0``)."""


def is_layer_norm(module: nn.Module) -> bool:
    """``nn.LayerNorm`` normalising the last dimensions (subclasses that permute, like timm's ``LayerNorm2d``,
    are not: their ``forward`` differs and they are not named ``LayerNorm``)."""
    return isinstance(module, nn.LayerNorm) and (
        type(module).forward is nn.LayerNorm.forward or type(module).__name__ == "LayerNorm"
    )


class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention``: returns the module's own output with the gradient of its math written out
    (projections, ``softmax(q kᵀ · s) v``, output projection), whose products ``ProductRules`` rules during
    the forward pass. Unmasked calls only (torchvision's ViT); masks given as keywords are not seen."""

    def check(self, module: nn.Module) -> None:
        if not isinstance(module, nn.MultiheadAttention):
            raise RuleError(f"MultiheadAttentionRule handles nn.MultiheadAttention, not {type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise RuleError("MultiheadAttentionRule supports nn.MultiheadAttention without bias_k/v and add_zero_attn")

    def forward(self, module, inputs, output):
        if any(isinstance(a, torch.Tensor) for a in inputs[3:]):
            raise RuleError("MultiheadAttentionRule does not handle masked calls (key_padding_mask/attn_mask)")
        if module.training and module.dropout:
            raise RuleError("nn.MultiheadAttention has active dropout: put the model in eval mode (model.eval())")
        with outside_checkpoint():
            path, _ = _mha_explicit(module, *inputs[:3])
        return (_straight_through(output[0], path),) + tuple(output[1:])


class AttnLRPComposite:
    """Which rule each kind of piece gets (see the module docstring); change the attributes, or subclass and
    override the ``*_rule`` factories (each returns a fresh rule for a module, or ``None`` for its plain
    gradient).

    ``product``: ``"uniform"`` (AttnLRP) or ``"gradient"``; ``softmax``: ``"taylor"`` (AttnLRP) or ``"held"``
    (CP-LRP: no gradient through the attention scores); ``norm``/``activation``: apply the identity rules;
    ``epsilon``: the ε of the ε-rule on Linear and ``Conv1D`` layers (0: their gradient, LRP-0);
    ``linear``/``conv``: a factory of the rule for every Linear/``Conv1D`` layer or convolution, e.g.
    ``linear=lambda: rules.Gamma(0.25)`` (any rule of :mod:`backprop_hooks.rules.lrp`; ``linear`` replaces
    ``epsilon``). Attributions are read out as ``x ⊙ ĝ`` at the input, so LRP rules sit with
    ``input_layer=False``.
    """

    name = "attnlrp"
    kind = "AttnLRP composite"

    def __init__(
        self,
        product: str = "uniform",
        softmax: str = "taylor",
        norm: bool = True,
        activation: bool = True,
        epsilon: float = 0.0,
        linear: Optional[RuleFactory] = None,
        conv: Optional[RuleFactory] = None,
    ) -> None:
        check_product_rules(product, softmax)
        self.product, self.softmax = product, softmax
        self.norm, self.activation = norm, activation
        self.epsilon, self.linear, self.conv = epsilon, linear, conv

    # -- the factories ------------------------------------------------------------------------------
    def norm_rule(self, module: nn.Module) -> Optional[Rule]:
        if not self.norm:
            return None
        if is_layer_norm(module):
            return LayerNormRule()
        return RMSNormRule() if is_rms_norm(module) else None

    def activation_rule(self, module: nn.Module) -> Optional[Rule]:
        if not self.activation:
            return None
        if is_gated_activation("", module):
            return IdentityRule()
        return IdentityRule(at_zero=1.0) if isinstance(module, nn.Tanh) else None

    def linear_rule(self, module: nn.Module) -> Optional[Rule]:
        if not (isinstance(module, nn.Linear) or is_hf_conv1d(module)):
            return None
        if self.linear is not None:
            return self.linear()
        return Epsilon(self.epsilon) if self.epsilon else None

    def conv_rule(self, module: nn.Module) -> Optional[Rule]:
        return self.conv() if self.conv is not None and isinstance(module, CONV_TYPES) else None

    def attention_rule(self, module: nn.Module) -> Optional[Rule]:
        return MultiheadAttentionRule() if isinstance(module, nn.MultiheadAttention) else None

    # -- what a method uses -------------------------------------------------------------------------
    def spec(self, model: nn.Module) -> Spec:
        """``(selector, rule)`` pairs for :func:`backprop_hooks.attach`: one rule instance per factory and rule
        type, on every module it applies to (fresh instances per call)."""
        factories = (self.attention_rule, self.norm_rule, self.activation_rule, self.linear_rule, self.conv_rule)
        groups: Dict[tuple, List] = {}
        uncovered: Dict[str, List[str]] = {}
        for name, module in model.named_modules():
            for factory in factories:
                rule = factory(module)
                if rule is not None:
                    key = (factory.__name__, type(rule), repr(rule))
                    groups.setdefault(key, [rule, []])[1].append(module)
                    break
            else:
                if self.norm and type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
                    uncovered.setdefault(type(module).__name__, []).append(name)
        if uncovered:
            listed = "; ".join(f"{kind} ({len(names)}: {', '.join(names[:2])}{', …' if len(names) > 2 else ''})"
                               for kind, names in uncovered.items())  # fmt: skip
            warnings.warn(
                f"AttnLRP has no rule for these norms, which keep their plain gradient (relevance is not conserved "
                f"through them): {listed}; give the composite a norm rule for them, or norm=False to silence this",
                UncoveredModuleWarning,
                stacklevel=5,
            )
        return [(_members(modules), rule) for rule, modules in groups.values()]

    def functions(self, x: torch.Tensor) -> ProductRules:
        """The function-level rules for the forward pass explaining ``x`` (a context manager)."""
        return ProductRules(x, self.product, self.softmax)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class CPLRP(AttnLRPComposite):
    """CP-LRP (Ali et al., ICML 2022) inside the attention, AttnLRP elsewhere: the attention probabilities held
    constant, so no relevance flows through the scores ``q kᵀ`` (``softmax="held"``)."""

    name = "cp_lrp"

    def __init__(self, **options) -> None:
        options.setdefault("softmax", "held")
        super().__init__(**options)


ATTNLRP_COMPOSITES: Dict[str, type] = {c.name: c for c in (AttnLRPComposite, CPLRP)}


def get_attnlrp_composite(composite="attnlrp", **options) -> AttnLRPComposite:
    """An AttnLRP composite from its name (``"attnlrp"``, ``"cp_lrp"``) and options, or an instance as is."""
    return get_composite(composite, registry=ATTNLRP_COMPOSITES, base=AttnLRPComposite, **options)


__all__ = [
    "AttnLRPComposite",
    "CPLRP",
    "ATTNLRP_COMPOSITES",
    "get_attnlrp_composite",
    "LayerNormRule",
    "RMSNormRule",
    "IdentityRule",
    "MultiheadAttentionRule",
    "is_layer_norm",
]
