r"""Vision Transformer methods: attention rollout, gradient-weighted rollout, transformer attribution,
GradCAM on tokens.

Attention probabilities ``A_l`` (B, heads, N, N) come from
:class:`backprop_hooks.rules.attention.AttentionCapture` on the unmodified model (fused kernels included);
per-layer gradients ``G_l = ∂f/∂A_l`` from one seeded backward pass, paired with ``A_l`` by tensor identity.
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
the model's own attributes (:func:`token_layout`).

None of the rollouts is linear in the seed (products over layers; ``rollout`` ignores it).
``vit_gradcam`` with ``relu=False`` is: ``φ = Σ_d w_d T_d``, ``w_d = mean_patches ∂f/∂T_d`` on a block's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from backprop_hooks.rules.attention import AttentionCapture, is_attention
from backprop_hooks.rules.capture import Capture
from backprop_hooks.rules.vit_relevance import GELUHeld, LayerNormHeld

from ..errors import LayerError, RuleError, TokenLayoutError
from .base import Method, grad, register
from .layers import get_module
from .rollout import check_options, discard, fuse_heads, rollout


# ------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class TokenLayout:
    """``prefix`` tokens (class, distillation, registers) followed by an ``h × w`` patch grid.

    ``readout``: the token rows the classifier reads (averaged), ``None`` for the mean over patch tokens.
    """

    prefix: int
    grid: Tuple[int, int]
    readout: Optional[Tuple[int, ...]] = (0,)

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    def check(self, n: int, what: str) -> None:
        if n != self.num_tokens:
            raise TokenLayoutError(
                f"{what} has {n} tokens, but the layout has {self.prefix} prefix tokens + a "
                f"{self.grid[0]}x{self.grid[1]} "
                f"grid = {self.num_tokens}; pass prefix_tokens=... and grid=(h, w) to the method"
            )

    def readout_rows(self, like: torch.Tensor) -> torch.Tensor:
        """(B, 1, N): the read-out as a row vector (uniform over the read tokens)."""
        r = torch.zeros(self.num_tokens, dtype=like.dtype, device=like.device)
        if self.readout is None:
            r[self.prefix :] = 1.0 / (self.num_tokens - self.prefix)
        else:
            r[list(self.readout)] = 1.0 / len(self.readout)
        return r.expand(like.shape[0], 1, -1)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) -> (B, h, w, ...): the patch tokens on their grid."""
        self.check(tokens.shape[1], "the token tensor")
        return tokens[:, self.prefix :].reshape(tokens.shape[0], *self.grid, *tokens.shape[2:])


def _vit_root(model: nn.Module) -> Optional[nn.Module]:
    for m in model.modules():
        if hasattr(m, "patch_embed") and hasattr(m, "num_prefix_tokens"):  # timm
            return m
        if hasattr(m, "class_token") and hasattr(m, "conv_proj") and hasattr(m, "patch_size"):  # torchvision
            return m
    return None


def token_layout(
    model: nn.Module, x: torch.Tensor, prefix_tokens: Optional[int] = None, grid: Optional[Tuple[int, int]] = None
) -> TokenLayout:
    """The token layout of a timm or torchvision ViT (found among ``model``'s modules) for input ``x``.

    ``prefix_tokens``/``grid`` override what the model says (for other architectures).
    """
    root = _vit_root(model)
    readout: Optional[Tuple[int, ...]] = (0,)
    if root is not None and hasattr(root, "num_prefix_tokens"):
        prefix = root.num_prefix_tokens
        pe = root.patch_embed
        found = pe.dynamic_feat_size(tuple(x.shape[-2:])) if getattr(root, "dynamic_img_size", False) else pe.grid_size
        if getattr(root, "global_pool", "token") != "token":
            readout = None
        elif getattr(root, "dist_token", None) is not None:
            readout = (0, 1)  # the distilled head averages the class- and distillation-token heads
    elif root is not None:
        prefix, p = 1, root.patch_size
        found = (x.shape[-2] // p, x.shape[-1] // p)
    else:
        found, prefix = None, None
    prefix = prefix if prefix_tokens is None else prefix_tokens
    found = found if grid is None else grid
    if prefix is None or found is None:
        raise TokenLayoutError(
            f"cannot find a timm or torchvision VisionTransformer in {type(model).__name__}; "
            "pass prefix_tokens=... and grid=(h, w) to the method"
        )
    return TokenLayout(int(prefix), (int(found[0]), int(found[1])), readout)


def attention_names(model: nn.Module) -> List[str]:
    """Qualified names of the attention modules (timm ``Attention``, ``nn.MultiheadAttention``), in order."""
    return [name for name, m in model.named_modules() if is_attention(name, m)]


def default_token_layer(model: nn.Module) -> str:
    """``model.default_layer`` if recorded, else the first LayerNorm of the last attention block (the input
    of the last attention: its patch tokens still reach the class token)."""
    recorded = getattr(model, "default_layer", None)
    if isinstance(recorded, str):
        return recorded
    names = attention_names(model)
    if names and "." in names[-1]:
        block = names[-1].rsplit(".", 1)[0]
        for child, m in get_module(model, block).named_children():
            if isinstance(m, nn.LayerNorm):
                return f"{block}.{child}"
    raise TokenLayoutError(f"cannot find a default token layer in {type(model).__name__}; pass layer=...")


# ------------------------------------------------------------------------------------------ methods
class _AttentionRollout(Method):
    """Template: capture ``A_l``; ``layer_matrices`` -> ``M_l``; roll out; read out the patch grid."""

    linear = False
    space = "tokens"
    per_call = ("_layout", "_capture")
    residual: str = "average"
    normalize: bool = True

    def __init__(
        self,
        model: nn.Module,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        prefix_tokens: Optional[int] = None,
        grid: Optional[Tuple[int, int]] = None,
        check_finite: bool = True,
    ):
        super().__init__(model, check_finite=check_finite)
        check_options(head_fusion, discard_ratio)
        self.head_fusion, self.discard_ratio = head_fusion, discard_ratio
        self.prefix_tokens, self.grid = prefix_tokens, grid

    def rules(self, x):
        self._layout = token_layout(self.model, x, self.prefix_tokens, self.grid)
        self._capture = AttentionCapture()
        return [(is_attention, self._capture)]

    def layer_matrices(
        self, attentions: Sequence[torch.Tensor], logits: torch.Tensor, seed: torch.Tensor
    ) -> List[torch.Tensor]:
        raise NotImplementedError

    def attention_gradients(
        self, logits: torch.Tensor, attentions: Sequence[torch.Tensor], seed: torch.Tensor, retain_graph: bool = False
    ) -> List[torch.Tensor]:
        """``[∂f/∂A_l]`` in one backward pass, in the order of ``attentions`` (paired by identity)."""
        return list(torch.autograd.grad(logits, list(attentions), seed, retain_graph=retain_graph))

    def attribute(self, x, logits, seed):
        layout, attentions = self._layout, self._capture.attentions
        if not attentions:
            raise RuleError(
                f"no attention module of {type(self.model).__name__} ran (timm Attention or nn.MultiheadAttention)"
            )
        layout.check(attentions[0].shape[-1], "the attention")
        mats = self.layer_matrices(attentions, logits, seed)
        if self.discard_ratio:
            mats = [discard(m, self.discard_ratio) for m in mats]
        flow = rollout(mats, self.residual, self.normalize, rows=layout.readout_rows(mats[0]))
        return layout.to_grid(flow[:, 0])


@register
class Rollout(_AttentionRollout):
    """Attention rollout (Abnar & Zuidema 2020): ``Â_l = (fuse_h(A_l) + I)/2``, rows normalised,
    ``R = Â_L ⋯ Â_1``. Independent of the target."""

    name = "rollout"

    def forward(self, x, classes, target):
        """The model's forward with autograd saving nothing: rollout never runs a backward, so the graph's
        activations need not be kept (peak memory: the attention maps, not the whole forward)."""
        with torch.autograd.graph.saved_tensors_hooks(_discard, _discarded):
            return super().forward(x, classes, target)

    def layer_matrices(self, attentions, logits, seed):
        return [fuse_heads(a.detach(), self.head_fusion) for a in attentions]


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

    def layer_matrices(self, attentions, logits, seed):
        grads = self.attention_gradients(logits, attentions, seed)
        mats = [fuse_heads(g * a.detach(), self.head_fusion) for a, g in zip(attentions, grads)]
        return [m.clamp_min(0) for m in mats] if self.clamp else mats


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
        self._held = [LayerNormHeld(enabled=False), GELUHeld(enabled=False)]
        return super().rules(x) + [(nn.LayerNorm, self._held[0]), (nn.GELU, self._held[1])]

    def _relevance_mode(self, on: bool) -> None:
        self._capture.hold_attention = on
        for rule in self._held:
            rule.enabled = on

    def layer_matrices(self, attentions, logits, seed):
        grads = self.attention_gradients(logits, attentions, seed, retain_graph=True)
        for g, a in zip(grads, attentions):  # G_l ⊙ A_l in place: these gradients are ours alone
            g.mul_(a.detach())
        self._relevance_mode(True)
        try:
            held = self.attention_gradients(logits, attentions, seed)
        finally:
            self._relevance_mode(False)
        mats = []
        for i, h in enumerate(held):  # one layer at a time, each gradient freed once used
            m = grads[i].mul_(h)
            grads[i] = held[i] = None
            mats.append(fuse_heads(m.clamp_min_(0) if self.clamp else m, self.head_fusion))
        return mats


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
        check_finite: bool = True,
    ):
        super().__init__(model, check_finite=check_finite)
        self.layer = default_token_layer(model) if layer is None else layer
        get_module(model, self.layer)
        self.relu, self.linear = relu, not relu
        self.prefix_tokens, self.grid = prefix_tokens, grid

    @property
    def layer_name(self) -> Optional[str]:
        return self.layer

    def rules(self, x):
        self._layout = token_layout(self.model, x, self.prefix_tokens, self.grid)
        self._capture = Capture()
        return {self.layer: self._capture}

    def attribute(self, x, logits, seed):
        if not self._capture.outputs:
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
        g = layout.to_grid(grad(logits, tokens, seed))
        cam = (g.mean(dim=(1, 2), keepdim=True) * layout.to_grid(tokens.detach())).sum(-1)
        return cam.clamp_min(0) if self.relu else cam
