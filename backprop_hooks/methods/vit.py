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
(:class:`TextLayout`) the tokens are the sequence: the read-out is one token per sample (the first for
encoders, the last non-padding one for causal models) and padded positions get exactly zero.

None of the rollouts is linear in the seed (products over layers; ``rollout`` ignores it).
``vit_gradcam`` with ``relu=False`` is: ``φ = Σ_d w_d T_d``, ``w_d = mean_patches ∂f/∂T_d`` on a block's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from backprop_hooks.rules.attention import AttentionCapture, is_attention
from backprop_hooks.rules.attention_nodes import Reduce
from backprop_hooks.rules.capture import Capture
from backprop_hooks.rules.vit_relevance import GELUHeld, LayerNormHeld
from backprop_hooks.rules.gates import HF_GELUS, GateHeld

from ..errors import LayerError, OptionError, RuleError, TokenLayoutError
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

    def mean_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) -> (B, 1, 1, D): the mean over the patch grid (GradCAM's channel weights)."""
        return grid.mean(dim=(1, 2), keepdim=True)


class TextLayout:
    """Tokens of a text batch: the sequence itself, ``mask`` (B, L) marking real tokens (1) and padding (0).

    ``readout``: the token each sample's prediction is read from, ``"first"`` (an encoder's class token),
    ``"last"`` (the last real token: a causal model's next-token position), or an index.
    """

    def __init__(self, mask: torch.Tensor, readout="first") -> None:
        self.mask = mask
        length = mask.shape[1]
        if readout == "first":
            self.readout_index = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        elif readout == "last":
            positions = torch.arange(length, device=mask.device).expand_as(mask)
            self.readout_index = (positions * (mask != 0)).amax(dim=1)
        elif isinstance(readout, int) and -length <= readout < length:
            self.readout_index = torch.full((mask.shape[0],), readout % length, dtype=torch.long, device=mask.device)
        else:
            raise OptionError(
                f"readout must be 'first', 'last' or a token index in [-{length}, {length}), got {readout!r}"
            )

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[1]

    def check(self, n: int, what: str) -> None:
        if n != self.num_tokens:
            raise TokenLayoutError(
                f"{what} has {n} tokens, but the text has {self.num_tokens}: explain the attention over the input "
                "sequence (a model that changes the sequence length, e.g. by pooling tokens, has no token layout)"
            )

    def readout_rows(self, like: torch.Tensor) -> torch.Tensor:
        """(B, 1, L): one-hot rows at each sample's read-out token."""
        rows = torch.zeros(like.shape[0], 1, self.num_tokens, dtype=like.dtype, device=like.device)
        return rows.scatter_(2, self.readout_index.view(-1, 1, 1), 1.0)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> the same, with padded positions exactly zero."""
        self.check(tokens.shape[1], "the token tensor")
        mask = self.mask.to(dtype=tokens.dtype).view(*self.mask.shape, *([1] * (tokens.dim() - 2)))
        return tokens * mask

    def mean_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, 1, D): the mean over real tokens."""
        mask = self.mask.to(dtype=tokens.dtype).unsqueeze(-1)
        return (tokens * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1)


def _hf_vision_config(model: nn.Module):
    """The Hugging Face config of a patch-based vision transformer among ``model``'s modules, or None."""
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "patch_size") and hasattr(config, "image_size"):
            return m, config
    return None, None


def _hf_layout(model: nn.Module, owner: nn.Module, config, x: torch.Tensor):
    """prefix tokens, grid and read-out of a Hugging Face ViT-like model (ViT, DeiT, BEiT, DINOv2, ...)."""
    patch = config.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    prefix = 1 + int(getattr(config, "model_type", "") == "deit") + int(getattr(config, "num_register_tokens", 0) or 0)
    readout: Optional[Tuple[int, ...]] = (0,)
    if any(type(m).__name__.endswith("WithTeacher") for m in (model, owner)):
        readout = (0, 1)  # DeiT's distilled head averages the class- and distillation-token heads
    elif getattr(config, "use_mean_pooling", False):
        readout = None  # BEiT / data2vec-vision classify the mean of the patch tokens
    return prefix, (x.shape[-2] // ph, x.shape[-1] // pw), readout


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
    """The token layout of a timm, torchvision or Hugging Face ViT (found among ``model``'s modules, or read
    from its config: class, distillation and register tokens, the patch grid of ``x``).

    ``prefix_tokens``/``grid`` override what the model says (for other architectures). A model may record
    its own layout as a callable attribute ``token_layout(x)`` (a :class:`TokenLayout` or :class:`TextLayout`).
    """
    recorded = getattr(model, "token_layout", None)
    if callable(recorded) and prefix_tokens is None and grid is None:
        return recorded(x)
    root = _vit_root(model)
    hf_owner, hf_config = _hf_vision_config(model) if root is None else (None, None)
    readout: Optional[Tuple[int, ...]] = (0,)
    if hf_config is not None:
        prefix, found, readout = _hf_layout(model, hf_owner, hf_config, x)
    elif root is not None and hasattr(root, "num_prefix_tokens"):
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
            f"cannot find a timm, torchvision or Hugging Face vision transformer in {type(model).__name__}; "
            "pass prefix_tokens=... and grid=(h, w) to the method"
        )
    return TokenLayout(int(prefix), (int(found[0]), int(found[1])), readout)


def _is_named_attention(name: str, module: nn.Module) -> bool:
    """timm ``Attention``, ``nn.MultiheadAttention``, or a module whose class is named ``*Attention``
    (Hugging Face: ``ViTAttention``, ``BertAttention``, ``GPT2Attention``, ...), outermost only."""
    return is_attention(name, module) or type(module).__name__.endswith("Attention")


def attention_names(model: nn.Module) -> List[str]:
    """Qualified names of the attention modules, in order (the outermost of nested ``*Attention`` modules)."""
    names = [name for name, m in model.named_modules() if _is_named_attention(name, m)]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _blocks_of(model: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """(last block, the block before it): the ancestor of the last attention module that is an item of a
    ``ModuleList``/``Sequential``, and its predecessor there (``None`` if it is the first)."""
    names = attention_names(model)
    if not names:
        return None, None
    parts = names[-1].split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        if parts[i].isdigit() and isinstance(get_module(model, parent), (nn.ModuleList, nn.Sequential)):
            index = int(parts[i])
            return f"{parent}.{index}", (f"{parent}.{index - 1}" if index > 0 else None)
    return None, None


def default_token_layer(model: nn.Module) -> str:
    """``model.default_layer`` if recorded; for timm and torchvision ViTs the first LayerNorm of the last
    attention block (the input of the last attention: its patch tokens still reach the class token); for
    other transformers (Hugging Face: pre- or post-norm, children in any order) the output of the block
    before the last, i.e. the last block's input."""
    recorded = getattr(model, "default_layer", None)
    if isinstance(recorded, str):
        return recorded
    names = [name for name, m in model.named_modules() if is_attention(name, m)]
    if names and "." in names[-1]:
        block = names[-1].rsplit(".", 1)[0]
        for child, m in get_module(model, block).named_children():
            if isinstance(m, nn.LayerNorm):
                return f"{block}.{child}"
    last, before = _blocks_of(model)
    if before is not None:
        return before
    if last is not None:  # a single block: its first LayerNorm (the attention's input in a pre-norm block)
        for child, m in get_module(model, last).named_children():
            if isinstance(m, nn.LayerNorm):
                return f"{last}.{child}"
    raise TokenLayoutError(f"cannot find a default token layer in {type(model).__name__}; pass layer=...")


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
        cam = (layout.mean_tokens(g) * layout.to_grid(tokens.detach())).sum(-1)
        return cam.clamp_min(0) if self.relu else cam
