"""Models for the benchmarks (random weights: timing does not depend on them) and their CAM layers."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

CNN_METHODS = [
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "gradcam",
    "xgradcam",
    "linear_approx",
    "fullgrad",
    "guided_backprop",
    "lrp",
]
VIT_METHODS = ["rollout", "grad_rollout", "transformer_attribution", "vit_gradcam"]
METHOD_OPTIONS = {"integrated_gradients": {"n_steps": 16}, "smoothgrad": {"n_samples": 16}}
LAYERS = {
    "resnet18": "layer4",
    "resnet50": "layer4",
    "vgg16_bn": "features.43",
    "vgg16": "features.30",
    "vit_tiny": "blocks.10",
}


def build(name: str, device: torch.device) -> Tuple[nn.Module, Optional[str], int, bool]:
    """``name`` or ``name@C`` (C classes) -> (model in eval mode, CAM layer, number of classes, is a ViT)."""
    base, _, classes = name.partition("@")
    num_classes = int(classes) if classes else 1000
    torch.manual_seed(0)
    if base == "vit_tiny":
        import timm

        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, dynamic_img_size=True
        )
        is_vit = True
    else:
        import torchvision

        model = getattr(torchvision.models, base)(weights=None, num_classes=num_classes)
        is_vit = False
    return model.eval().to(device), LAYERS.get(base), num_classes, is_vit
