r"""Bias-gradients for FullGrad: ``b ⊙ ∂f/∂y`` at every module with a bias, read in the backward pass.

For a module whose output is ``y = W(x) + b`` (``b`` broadcast over the spatial positions), FullGrad
(Srinivas & Fleuret 2019) attributes ``b_c · ∂f/∂y_c`` to every output position. The (effective) bias is

* ``nn.Conv{1,2,3}d`` / ``nn.Linear`` with ``bias``: the bias parameter;
* ``nn.BatchNorm{1,2,3}d``: the affine map's offset ``c = β − μ γ / sqrt(σ² + ε)`` (``γ = 1``, ``β = 0``
  when not affine), with the running statistics in eval mode and the batch's statistics in training
  mode (then the map is affine for that batch only).

The rule only reads ``grad_output``; it never changes a gradient. Each call yields the raw contribution
``b ⊙ g`` with channels on dim 1 (a ``Linear`` on a channel-last ``(B, h, w, C)`` map is moved to
``(B, C, h, w)``), which the rule reduces at once with ``reduce`` so that nothing layer-sized is kept.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from backprop_hooks.errors import RuleError
from backprop_hooks.rule import Grads, Rule

BIASED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)

Reduce = Callable[[torch.Tensor], torch.Tensor]


def has_bias(module: nn.Module) -> bool:
    """Whether FullGrad counts ``module``: a conv or linear layer with a bias, or any BatchNorm."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return isinstance(module, BIASED) and getattr(module, "bias", None) is not None


def effective_bias(module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The per-channel offset ``b`` of ``module``'s affine map (see the module docstring)."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.bias.detach()
    if module.training or module.running_mean is None:
        x = inputs[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = module.running_mean, module.running_var
    scale = torch.rsqrt(var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach()
    shift = -mean * scale
    return shift + module.bias.detach() if module.bias is not None else shift


def channels_first(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` with channels on dim 1 (a ``Linear`` acts on the last dim)."""
    return t.movedim(-1, 1) if isinstance(module, nn.Linear) and t.dim() > 2 else t


def is_spatial(module: nn.Module, output: torch.Tensor) -> bool:
    """Whether the contribution is a spatial map: conv/BatchNorm outputs ``(B, C, *s)``; a ``Linear``
    only on a channel-last image map ``(B, h, w, C)`` (token sequences and vectors are not spatial)."""
    if isinstance(module, nn.Linear):
        return output.dim() == 4
    return output.dim() >= 3


class BiasGradient(Rule):
    """Records ``b ⊙ ∂f/∂y`` for each call of the biased modules it sits on.

    ``records``: ``(module, raw, reduced)`` per call in backward order, where ``raw`` is the channel sum of
    ``b ⊙ g`` (``(B, *s)`` for spatial outputs, ``(B,)`` otherwise) and ``reduced = reduce(b ⊙ g)`` (spatial
    outputs only, else ``None``). ``reduce`` maps ``(B, C, *s) -> (B, *s)``; default: the channel sum.
    """

    linear = True

    def __init__(self, reduce: Optional[Reduce] = None):
        self.reduce = reduce
        self.records: List[Tuple[nn.Module, torch.Tensor, Optional[torch.Tensor]]] = []

    def check(self, module: nn.Module) -> None:
        if not has_bias(module):
            raise RuleError(
                f"BiasGradient needs a conv or linear layer with a bias, or a BatchNorm; got {type(module).__name__}"
                + (" without a bias" if isinstance(module, BIASED) else "")
            )

    def forward(self, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise RuleError(
                f"BiasGradient needs a tensor output; {type(module).__name__} returned {type(output).__name__}"
            )
        self.ctx.bias = effective_bias(module, inputs)
        self.ctx.spatial = is_spatial(module, output)
        return None

    def backward(self, module: nn.Module, grad_input: Grads, grad_output: Grads) -> None:
        g = grad_output[0]
        if g is None:
            return None
        g = channels_first(module, g)
        contribution = self.ctx.bias.to(g.dtype).view(1, -1, *([1] * (g.dim() - 2))) * g
        if self.ctx.spatial:
            raw = contribution.sum(1)
            reduced = raw if self.reduce is None else self.reduce(contribution)
        else:
            raw, reduced = contribution.flatten(1).sum(1), None
        self.records.append((module, raw, reduced))
        return None

    def by_name(self, names: Dict[nn.Module, str]) -> List[Tuple[str, torch.Tensor, Optional[torch.Tensor]]]:
        """Records in forward order, keyed by qualified name (``name#k`` for the k-th repeated call)."""
        seen: Dict[str, int] = {}
        out = []
        for module, raw, reduced in reversed(self.records):
            name = names[module]
            k = seen[name] = seen.get(name, -1) + 1
            out.append((name if k == 0 else f"{name}#{k}", raw, reduced))
        return out
