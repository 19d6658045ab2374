r"""Where the tokens of a transformer are: prefix tokens (class, distillation, register), the patch grid and
the read-out token of a ViT (:class:`TokenLayout`, :func:`token_layout`, from the model's attributes or its
Hugging Face config), the sequence of a text model (``TextLayout``), and the blocks whose tokens the
token methods read (:func:`default_token_layer`, :func:`attention_names`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from backprop_hooks.rules.attention import is_attention

from ..causal import last_real
from ..errors import OptionError, TokenLayoutError
from .layers import get_module


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
            self.readout_index = last_real(mask)
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
    its own layout as a callable attribute ``token_layout(x)`` (a :class:`TokenLayout` or ``TextLayout``).
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


__all__ = ["TokenLayout", "TextLayout", "token_layout", "attention_names", "default_token_layer"]
