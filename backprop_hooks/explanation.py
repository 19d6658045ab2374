"""The result of an explanation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def upsample(m: torch.Tensor, size: Tuple[int, ...]) -> torch.Tensor:
    """Resize maps ``(B, *s)`` to ``size``: (bi/tri)linear by rank, ``align_corners=False``; identity if equal."""
    if tuple(m.shape[1:]) == tuple(size):
        return m
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(m[:, None], size=size, mode=mode, align_corners=False)[:, 0]


def to_maps(attributions: torch.Tensor, input_shape: Tuple[int, ...]) -> torch.Tensor:
    """Signed spatial maps at input resolution.

    * input-shaped ``(B, Cin, H, W)``: summed over channels;
    * a layer or token grid ``(B, h, w)``: bilinearly upsampled to ``(H, W)``;
    * non-image inputs ``(B, F)`` / ``(B, Cin, L)``: returned as ``(B, F)`` / summed to ``(B, L)``.
    """
    if len(input_shape) == 4:
        size = tuple(input_shape[-2:])
        return upsample(attributions.sum(dim=1) if attributions.dim() == 4 else attributions, size)
    if len(input_shape) == 3 and attributions.dim() == 3:
        return attributions.sum(dim=1)
    return attributions


@dataclass
class Explanation:
    """What ``bh.explain`` returns.

    ``attributions``: raw, in the method's own space (input-shaped, a layer grid (B,h,w) or a token grid);
    ``maps``: (B,H,W) signed spatial maps at input resolution (computed on first access);
    ``linear``: whether the method is linear in the seed, i.e. whether the contrast identities hold.

    ``plot()`` draws it (matplotlib, the ``cli`` extra), and a notebook shows it inline: image explanations as
    their maps, text explanations (``bh.explain_text``) as the coloured token heat-map.
    """

    attributions: torch.Tensor
    logits: torch.Tensor
    classes: torch.Tensor
    method: str
    target: str
    linear: bool
    input_shape: Tuple[int, ...]
    layer: Optional[str] = None
    extras: dict = field(default_factory=dict)
    _maps: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def maps(self) -> torch.Tensor:
        if self._maps is None:
            self._maps = to_maps(self.attributions, self.input_shape)
        return self._maps

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)

    def plot(self, image: Any = None, ax: Any = None, **options: Any):
        """Draw the signed maps over ``image``; returns a matplotlib ``Figure`` (or ``ax`` when given).

        ``image``: the explained input, (B, C, H, W) or one image, in the format you have: a tensor or numpy
        array (C, H, W) or (H, W, C), float in [0, 1] or 0-255, uint8, or a PIL image (None: the maps alone).
        A normalised image is undone with ``normalization=`` (``(mean, std)``, a Hugging Face image processor,
        a timm model); without it, it is drawn stretched to its range with an ``ImageRangeWarning``.
        The scale is the command line's: pixel-space maps on ±the 99th percentile of ``|value|``, each pixel as
        opaque as it is strong; layer and token-grid maps on ±max ``|value|`` at opacity 0.5 (``alpha=``,
        ``percentile=`` override); a map without sign (a magnitude) in red alone, from zero. The colour bar says
        what the colours mean and which scale is drawn, the title names method, target, class and probability
        (``class_names=`` names them). A batch draws as a grid (``index=i``: one sample; ``columns``,
        ``max_panels``, ``panel_size``, ``dpi``): ``scale="shared"`` puts every panel on one scale,
        ``"panel"`` each on its own (its limit in its title); default ``"shared"`` when every panel shows the
        same image (its classes compare), else ``"panel"``. With ``ax=`` one sample is drawn into a pyplot
        axes, its colour bar inside the axes' own place. A text explanation draws its token heat-map
        (``tokens=``: one list of strings per sequence, or a function of a sequence's ids such as a tokenizer's
        ``convert_ids_to_tokens``; default: the ids; ``scale="robust"`` clips and outlines tokens that dominate
        a sequence, ``"max"`` does not).
        """
        from .plotting.explanations import plot

        return plot(self, image, ax, **options)

    def named(self, class_names: Optional[Sequence[str]] = None, tokens: Any = None) -> "Explanation":
        """A copy that names its classes (and a text explanation its tokens) in :meth:`plot` and in a
        notebook's inline view; the tensors are shared, not copied."""
        given = {"class_names": class_names, "tokens": tokens}
        return replace(self, extras={**self.extras, **{k: v for k, v in given.items() if v is not None}})

    def _repr_png_(self) -> Optional[bytes]:
        """The notebook's picture: the maps (image explanations) or the token heat-map; None if it cannot be
        drawn (never raises: the text repr shows instead)."""
        try:
            from .plotting.explanations import inline_png

            return inline_png(self)
        except Exception:
            return None

    def _repr_html_(self) -> Optional[str]:
        """A text explanation's token heat-map as HTML (a notebook prefers it to the PNG); None otherwise."""
        try:
            from .plotting.explanations import inline_html

            return inline_html(self)
        except Exception:
            return None

    def __repr__(self) -> str:
        return (
            f"Explanation(method={self.method!r}, target={self.target!r}, linear={self.linear}, "
            f"attributions={tuple(self.attributions.shape)}, classes={self.classes.tolist()})"
        )
