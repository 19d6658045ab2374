r"""A module's real-valued weights where they are not plain parameters: offloaded or quantised.

* **Offloaded** (accelerate's ``cpu_offload``, ``disk_offload``, ``dispatch_model`` with ``"cpu"``/``"disk"``
  in the device map, ``from_pretrained(device_map=..., offload_folder=...)``): an offloaded module's
  parameters are on the ``meta`` device (shapes, no values) except during its own forward calls, for which
  the offload hook loads them from a CPU state dict or from files. Autograd's backward keeps the loaded
  tensors it saved, but a rule that reads a weight in the backward pass would see the meta tensor:
  :func:`module_tensor` reads it from the offload instead.
* **Quantised linear layers** (optimum-quanto's ``QLinear``, bitsandbytes' ``Linear8bitLt`` and
  ``Linear4bit``): the layer computes ``x W̃ᵀ + b`` with its dequantised weight ``W̃``, and gradients flow
  through it as through any layer. :func:`module_tensor` gives ``W̃``, so the LRP rules (AttnLRP's ε-rule)
  treat the layer as the linear map it computes (bitsandbytes' 8-bit layers on CUDA also quantise their input:
  the rules then use the layer's own output ``z`` with ``W̃``).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import itertools

import torch
from torch import nn

from .errors import ModelError

_BNB_WEIGHTS = ("Int8Params", "Params4bit")


def _hooks(module: nn.Module) -> Iterator[Any]:
    """The accelerate hooks on ``module`` (a ``SequentialHook`` unrolled)."""
    hook = getattr(module, "_hf_hook", None)
    stack = [hook] if hook is not None else []
    while stack:
        hook = stack.pop()
        stack.extend(getattr(hook, "hooks", ()) or ())
        yield hook


def offloaded(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """The value of ``module``'s tensor ``name`` held by an accelerate offload hook on the module, on the
    hook's execution device; ``None`` when no hook holds it."""
    for hook in _hooks(module):
        weights = getattr(hook, "weights_map", None)
        if getattr(hook, "offload", False) and weights is not None and name in weights:
            value = weights[name]
            device = getattr(hook, "execution_device", None)
            return value if device is None else value.to(device)
    return None


def input_device(module: nn.Module) -> torch.device:
    """Where ``module``'s inputs go: an accelerate hook's execution device, else the device of its first tensor
    that is not on ``meta``, else the CPU."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def is_quantized(tensor: Any) -> bool:
    """An optimum-quanto weight (a ``QTensor``) or a bitsandbytes ``Int8Params``/``Params4bit``."""
    cls = type(tensor)
    return cls.__module__.startswith("optimum.quanto") or (
        cls.__module__.startswith("bitsandbytes") and cls.__name__ in _BNB_WEIGHTS
    )


def is_quantized_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` subclass whose weight is quantised (``QLinear``, ``Linear8bitLt``, ``Linear4bit``)."""
    return isinstance(module, nn.Linear) and is_quantized(getattr(module, "weight", None))


def dequantized(weight: Any, module: Optional[nn.Module] = None) -> torch.Tensor:
    """The real-valued weight ``W̃`` that a quantised layer (``module``) multiplies by."""
    if type(weight).__module__.startswith("optimum.quanto"):
        return weight.dequantize()
    import bitsandbytes.functional as bnb  # a bitsandbytes weight exists only when bitsandbytes is installed

    if type(weight).__name__ == "Params4bit":
        return bnb.dequantize_4bit(weight.data, weight.quant_state)
    scales = getattr(weight, "SCB", None)
    if scales is None:  # Linear8bitLt moves the scales to its state at its first call
        scales = getattr(getattr(module, "state", None), "SCB", None)
    if scales is None:
        raise ModelError(
            "a bitsandbytes Int8Params weight without its scales (SCB): move the model to its device (which "
            "quantises the weights) before explaining it"
        )
    return bnb.int8_vectorwise_dequant(weight.data, scales)


def module_tensor(module: nn.Module, name: str = "weight") -> Optional[torch.Tensor]:
    """``module.<name>`` as a real-valued tensor, detached (``None`` when the module has none): also where an
    offload hook keeps it on the meta device between calls, and dequantised for a quantised weight. A meta
    tensor that no hook holds raises :class:`~backprop_hooks.errors.ModelError`."""
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor):
        return tensor
    if tensor.is_meta:
        value = offloaded(module, name)
        if value is None:
            raise ModelError(
                f"{type(module).__name__}.{name} is on the meta device (no values) and no accelerate offload hook "
                "on the module holds them: load the weights (accelerate's dispatch_model, cpu_offload or "
                "disk_offload load each module's weights for its forward call) before explaining the model"
            )
        tensor = value if is_quantized(value) else value.to(tensor.dtype)
    return (dequantized(tensor, module) if is_quantized(tensor) else tensor).detach()


__all__ = ["module_tensor", "offloaded", "is_quantized", "is_quantized_linear", "dequantized"]
