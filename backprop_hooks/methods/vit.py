r"""Vision Transformer methods: attention rollout, gradient-weighted rollout, transformer attribution,
GradCAM on tokens.

Attention probabilities ``A_l`` (B, heads, N, N) come from
:class:`backprop_hooks.rules.attention.AttentionCapture` on the unmodified model: per function call
(``scaled_dot_product_attention`` with its masks, explicit softmax attention) for timm, Hugging Face and any
model that computes attention either way, per module for ``nn.MultiheadAttention`` (torchvision);
per-layer gradients ``G_l = ∂f/∂A_l`` from one seeded backward pass (fused attention: ``A_l`` itself is computed
in that pass, from the saved ``q``, ``k``, ``v``), paired with ``A_l`` by the call's index in forward order.
Each rollout method turns ``(A_l, G_l)`` into a token-mixing matrix ``M_l``
and hands the list to :func:`~.rollout.rollout`:

* ``rollout`` (Abnar & Zuidema 2020): ``M_l = fuse_h(A_l)``, ``Â_l = (M_l + I)/2``, rows normalised;
* ``grad_rollout``: ``M_l = fuse_h(G_l ⊙ A_l)`` (``clamp``: ``max(·, 0)``), then as ``rollout``;
* ``transformer_attribution`` (Chefer et al. 2021): ``M_l = mean_h[G_l ⊙ R_l]`` (``clamp``: of
  ``(G_l ⊙ R_l)⁺``), ``Â_l = M_l + I``, no normalisation; ``R_l = A_l ⊙ ∂̃f/∂A_l`` is the relevance of
  ``A_l`` from a second backward pass with the conservative relevance rules of
  :mod:`backprop_hooks.rules.vit_relevance`.

The attribution of patch ``j`` is the read-out row of ``Â_L ⋯ Â_1`` (the class token's; for a distilled
DeiT the mean of class and distillation tokens; for an average-pooled head the mean over patch tokens),
reshaped to the patch grid (B, h, w). Prefix tokens (class, distillation, register) and the grid come from
the model's own attributes or its Hugging Face config (:func:`token_layout`). For text
(``TextLayout``) the tokens are the sequence: the read-out is one token per sample (the first for
encoders, the last non-padding one for causal models) and padded positions get exactly zero.

None of the rollouts is linear in the seed (products over layers; ``rollout`` ignores it).
``vit_gradcam`` with ``relu=False`` is: ``φ = Σ_d w_d T_d``, ``w_d = mean_patches ∂f/∂T_d`` on a block's tokens.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from backprop_hooks.rules.attention import AttentionCapture
from backprop_hooks.rules.attention_nodes import Reduce
from backprop_hooks.rules.capture import Capture
from backprop_hooks.rules.vit_relevance import GELUHeld, LayerNormHeld
from backprop_hooks.rules.gates import HF_GELUS, GateHeld

from ..checkpointing import reentrant_checkpoint_in, reentrant_error
from ..errors import LayerError, RuleError, TokenLayoutError
from ..precision import widen
from .base import Method, grad, register
from .layers import get_module
from .rollout import check_options, discard, fuse_heads, rollout
from .tokens import default_token_layer, token_layout


def _present(model: nn.Module, kind) -> bool:
    return any(isinstance(m, kind) for m in model.modules())


# ------------------------------------------------------------------------------------------ methods
class _AttentionRollout(Method):
    """Template: capture ``A_l``; ``layer_matrices`` -> ``M_l``; roll out; read out the patch grid."""

    linear = False
    space = "tokens"
    per_call = ("_layout", "_capture")
    residual: str = "average"
    normalize: bool = True
    differentiable: bool = True  # False: the maps are read, never differentiated (no gradient path is built)

    def __init__(
        self,
        model: nn.Module,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        prefix_tokens: Optional[int] = None,
        grid: Optional[Tuple[int, int]] = None,
        layout=None,
        check_finite: bool = True,
    ):
        super().__init__(model, check_finite=check_finite)
        check_options(head_fusion, discard_ratio)
        self.head_fusion, self.discard_ratio = head_fusion, discard_ratio
        self.prefix_tokens, self.grid, self.layout = prefix_tokens, grid, layout

    def rules(self, x):
        self._layout = self.layout or token_layout(self.model, x, self.prefix_tokens, self.grid)
        self._capture = AttentionCapture(differentiable=self.differentiable)
        # per function call for everything that calls scaled_dot_product_attention or an explicit softmax;
        # per module for nn.MultiheadAttention, whose functional core the function-level capture cannot see
        return [(nn.MultiheadAttention, self._capture)] if _present(self.model, nn.MultiheadAttention) else []

    def forward(self, x, classes, target):
        with self._capture.recording():
            return super().forward(x, classes, target)

    def layer_matrices(self, capture: AttentionCapture, logits: torch.Tensor, seed: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError

    def attention_gradients(
        self, logits: torch.Tensor, seed: torch.Tensor, reduce: Reduce, retain_graph: bool = False
    ) -> List[torch.Tensor]:
        """``[reduce(l, A_l, ∂f/∂A_l)]`` from one backward pass, in forward order (see
        :meth:`AttentionCapture.gradients`: each layer's pair is reduced as it arrives)."""
        return self._capture.gradients(logits, seed, retain_graph=retain_graph, reduce=reduce)

    def attribute(self, x, logits, seed):
        layout, capture = self._layout, self._capture
        if not capture.shapes:
            raise RuleError(
                f"no attention ran in {type(self.model).__name__}'s forward pass (scaled_dot_product_attention, "
                "a softmax over the last axis of (B, heads, N, N) scores, or nn.MultiheadAttention)"
            )
        layout.check(capture.shapes[0][-1], "the attention")
        mats = self.layer_matrices(capture, logits, seed)
        if self.discard_ratio:
            mats = [discard(m, self.discard_ratio) for m in mats]
        flow = rollout(mats, self.residual, self.normalize, rows=layout.readout_rows(mats[0]))
        return layout.to_grid(flow[:, 0])


@register
class Rollout(_AttentionRollout):
    """Attention rollout (Abnar & Zuidema 2020): ``Â_l = (fuse_h(A_l) + I)/2``, rows normalised,
    ``R = Â_L ⋯ Â_1``. Independent of the target."""

    name = "rollout"
    differentiable = False

    def forward(self, x, classes, target):
        """The model's forward with autograd saving nothing: rollout never runs a backward, so the graph's
        activations need not be kept (peak memory: the attention maps, not the whole forward)."""
        with torch.autograd.graph.saved_tensors_hooks(_discard, _discarded):
            return super().forward(x, classes, target)

    def layer_matrices(self, capture, logits, seed):
        return [fuse_heads(a.detach(), self.head_fusion) for a in capture.attentions]


def _discard(tensor: torch.Tensor) -> None:
    return None


def _discarded(_: None) -> torch.Tensor:
    raise RuleError("rollout keeps no tensors for a backward pass: its logits cannot be differentiated")


@register
class GradRollout(_AttentionRollout):
    """Gradient-weighted rollout: ``M_l = fuse_h(G_l ⊙ A_l)`` (signed; ``clamp=True``: ``max(M_l, 0)``),
    ``Â_l = (M_l + I)/2``, rows normalised to unit ℓ1 norm, ``R = Â_L ⋯ Â_1``."""

    name = "grad_rollout"

    def __init__(self, model, clamp: bool = False, **kw):
        super().__init__(model, **kw)
        self.clamp = clamp

    def layer_matrices(self, capture, logits, seed):
        def reduce(index: int, attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            m = fuse_heads(grad.mul_(attn), self.head_fusion)  # the gradient is ours alone: in place
            return m.clamp_min(0) if self.clamp else m

        return self.attention_gradients(logits, seed, reduce)


@register
class TransformerAttribution(_AttentionRollout):
    """Chefer et al. 2021: ``Â_l = I + mean_h[G_l ⊙ R_l]`` (``clamp=True``: ``(G_l ⊙ R_l)⁺``, as in the
    paper), ``R = Â_L ⋯ Â_1``, with the relevance ``R_l = A_l ⊙ ∂̃f/∂A_l`` of a second backward pass over
    the same graph under the held-gate rules (LayerNorm σ, GELU gate, attention; Ali et al. 2022), which
    stand in for Chefer's LRP so that the relevance is conservative and linear in the seed.

    Each layer's term is a product of two factors linear in the seed (``G_l`` and ``R_l``), so the map does
    not change when the seed changes sign: "why t, not s" gives the map of "why s, not t". For the direction
    of a contrast use ``grad_rollout`` (signed) or ``vit_gradcam``. Costs one forward and two backward passes.
    """

    name = "transformer_attribution"
    per_call = ("_layout", "_capture", "_held")
    residual, normalize = "add", False

    def __init__(self, model, clamp: bool = False, **kw):
        super().__init__(model, **kw)
        self.clamp = clamp

    def rules(self, x):
        self._held = [LayerNormHeld(enabled=False), GELUHeld(enabled=False), GateHeld(enabled=False)]
        rules = super().rules(x)
        if _present(self.model, nn.LayerNorm):
            rules.append((nn.LayerNorm, self._held[0]))
        if _present(self.model, nn.GELU):
            rules.append((nn.GELU, self._held[1]))
        if any(type(m).__name__ in HF_GELUS for m in self.model.modules()):
            rules.append((lambda name, m: type(m).__name__ in HF_GELUS, self._held[2]))
        return rules

    def _relevance_mode(self, on: bool) -> None:
        self._capture.hold_attention = on
        for rule in self._held:
            rule.enabled = on

    def layer_matrices(self, capture, logits, seed):
        """Two passes over one graph: ``G_l ⊙ A_l`` per head (kept until the second pass), then each layer's
        ``mean_h[G_l ⊙ A_l ⊙ ∂̃f/∂A_l]`` as its held gradient arrives (its first-pass term freed at once)."""
        weighted = self.attention_gradients(logits, seed, lambda i, a, g: g.mul_(a), retain_graph=True)

        def reduce(index: int, attn: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
            m, weighted[index] = weighted[index].mul_(held), None
            return fuse_heads(m.clamp_min_(0) if self.clamp else m, self.head_fusion)

        self._relevance_mode(True)
        try:
            return self.attention_gradients(logits, seed, reduce)
        finally:
            self._relevance_mode(False)


class _TokenCapture(Capture):
    """:class:`Capture` of a block's token output, also when the block returns a tuple (Hugging Face layers
    may return ``(hidden_states, ...)``): the first element is recorded and its consumers get a copy."""

    def forward(self, module, inputs, output):
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            self.outputs.append(output[0])
            return (output[0].clone(),) + output[1:]
        return super().forward(module, inputs, output)


@register
class ViTGradCAM(Method):
    """GradCAM on a block's tokens ``T`` (B, N, D): ``φ = Σ_d w_d T_d`` on the patch grid,
    ``w_d = mean_patches ∂f/∂T_d``; linear in the seed unless ``relu=True``.

    ``layer``: a module whose output is the token sequence (e.g. ``"blocks.10"`` or ``"blocks.11.norm1"``);
    default: ``model.default_layer`` or the first LayerNorm of the last attention block.
    """

    name = "vit_gradcam"
    takes_layer = True
    space = "tokens"
    per_call = ("_layout", "_capture")

    def __init__(
        self,
        model: nn.Module,
        layer: Optional[str] = None,
        relu: bool = False,
        prefix_tokens: Optional[int] = None,
        grid: Optional[Tuple[int, int]] = None,
        layout=None,
        check_finite: bool = True,
    ):
        super().__init__(model, check_finite=check_finite)
        self.layer = default_token_layer(model) if layer is None else layer
        get_module(model, self.layer)
        self.relu, self.linear = relu, not relu
        self.prefix_tokens, self.grid, self.layout = prefix_tokens, grid, layout

    @property
    def layer_name(self) -> Optional[str]:
        return self.layer

    def rules(self, x):
        self._layout = self.layout or token_layout(self.model, x, self.prefix_tokens, self.grid)
        self._capture = _TokenCapture()
        return {self.layer: self._capture}

    def attribute(self, x, logits, seed):
        if not self._capture.outputs:
            if reentrant_checkpoint_in(logits):  # the layer ran without gradients, inside the checkpoint
                raise reentrant_error()
            raise LayerError(
                f"layer {self.layer!r} did not run in the model's forward pass; "
                "choose a layer on the path to the logits"
            )
        tokens, layout = self._capture.output, self._layout
        if tokens.dim() != 3:
            raise TokenLayoutError(
                f"layer {self.layer!r} outputs shape {tuple(tokens.shape)}; vit_gradcam needs tokens (B, N, D)"
            )
        layout.check(tokens.shape[1], f"the output of layer {self.layer!r}")
        g = layout.to_grid(widen(grad(logits, tokens, seed)))  # float32 for a half-precision model
        cam = (layout.mean_tokens(g) * layout.to_grid(widen(tokens.detach()))).sum(-1)
        return cam.clamp_min(0) if self.relu else cam
