"""Linear and convolution layers as the LRP rules see them: which layers a rule accepts, their forward
``W x + b`` with given parameters and the vector-Jacobian product ``Wᵀ s`` (nn.Linear, zero-padded
nn.Conv1d/2d/3d, timm's ``Conv2dSame`` and Hugging Face's ``Conv1D``)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from backprop_hooks.errors import RuleError
from backprop_hooks.module_weights import is_quantized_linear
from backprop_hooks.rule import Rule

Tensor = torch.Tensor

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES = (nn.Linear,) + CONV_TYPES


def _conv_geometry(module: nn.Module):
    n = module.weight.dim() - 2
    padding = module.padding
    if padding == "valid":
        padding = (0,) * n
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        padding = tuple(t // 2 for t in total)
    return list(module.stride), list(padding), list(module.dilation), [0] * n, module.groups


def is_conv2d_same(module: nn.Module) -> bool:
    """timm's ``Conv2dSame``: a Conv2d that pads its input TensorFlow-style ("SAME", possibly asymmetric,
    computed from the input size) and then convolves without padding."""
    cls = type(module)
    return cls.__name__ == "Conv2dSame" and cls.__module__.startswith("timm.") and isinstance(module, nn.Conv2d)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer ``x @ W + b`` with ``W`` stored as (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def same_padding(module: nn.Module, x: Tensor) -> Optional[Tuple[int, ...]]:
    """``F.pad`` amounts (left, right, top, bottom) of a ``Conv2dSame`` for the input ``x``; ``None`` for
    any other layer (its padding is part of the convolution)."""
    if not is_conv2d_same(module):
        return None
    pads: Tuple[int, ...] = ()
    for size, k, s, d in zip(
        reversed(x.shape[-2:]), reversed(module.kernel_size), reversed(module.stride), reversed(module.dilation)
    ):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += (total // 2, total - total // 2)
    return pads


def layer_forward(module: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``W x + b`` for a Linear, ConvNd or Hugging Face ``Conv1D`` module, with the given parameters."""
    if isinstance(module, nn.Linear):
        return torch.nn.functional.linear(x, weight, bias)
    if is_hf_conv1d(module):
        return torch.nn.functional.linear(x, weight.T, bias)
    pads = same_padding(module, x)
    if pads is not None:
        x = torch.nn.functional.pad(x, pads)
    stride, padding, dilation, out_pad, groups = _conv_geometry(module)
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, out_pad, groups)


def layer_vjp(module: nn.Module, x: Tensor, weight: Tensor, s: Tensor) -> Tensor:
    """``Wᵀ s``: the vector-Jacobian product of ``W x`` with respect to ``x`` (shaped like ``x``)."""
    if isinstance(module, nn.Linear):
        return s.matmul(weight.to(s.dtype))
    if is_hf_conv1d(module):
        return s.matmul(weight.to(s.dtype).T)
    stride, padding, dilation, out_pad, groups = _conv_geometry(module)
    pads = same_padding(module, x)
    padded = x if pads is None else torch.nn.functional.pad(x, pads)
    v = torch.ops.aten.convolution_backward(
        s, padded, weight, None, stride, padding, dilation, False, out_pad, groups, [True, False, False]
    )[0]
    if pads is None:
        return v
    h, w = x.shape[-2:]
    return v[..., pads[2] : pads[2] + h, pads[0] : pads[0] + w].contiguous()  # the padding gets no relevance


def check_layer(rule: Rule, module: nn.Module) -> None:
    """Raise :class:`RuleError` unless ``module`` is a plain Linear, a quantised Linear (optimum-quanto,
    bitsandbytes), a zero-padded ConvNd, timm's ``Conv2dSame`` (zero "SAME" padding) or Hugging Face's
    ``Conv1D`` (a linear layer)."""
    name = type(rule).__name__
    if is_hf_conv1d(module):
        return
    if not isinstance(module, LAYER_TYPES):
        raise RuleError(
            f"{name} is an LRP rule for nn.Linear and nn.Conv1d/2d/3d layers; it was put on a "
            f"{type(module).__name__}. Select layers by type, e.g. {{nn.Conv2d: {name}()}}"
        )
    base = nn.Linear if isinstance(module, nn.Linear) else next(t for t in CONV_TYPES if isinstance(module, t))
    if is_quantized_linear(module):  # x W̃ᵀ + b with the dequantised weight W̃ (rules read W̃)
        return
    if type(module).forward is not base.forward and not is_conv2d_same(module):
        raise RuleError(f"{name} cannot handle {type(module).__name__}: it overrides {base.__name__}.forward")
    if isinstance(module, CONV_TYPES):
        if module.padding_mode != "zeros":
            raise RuleError(
                f"{name} supports zero-padded convolutions only; "
                f"{type(module).__name__} has padding_mode={module.padding_mode!r}"
            )
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            raise RuleError(
                f"{name} cannot handle padding='same' with an even effective kernel size (asymmetric padding)"
            )


__all__ = [
    "CONV_TYPES",
    "LAYER_TYPES",
    "is_conv2d_same",
    "is_hf_conv1d",
    "same_padding",
    "layer_forward",
    "layer_vjp",
    "check_layer",
]
