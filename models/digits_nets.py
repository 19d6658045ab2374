"""Two small networks for the 32x32 digits: a CNN and a Vision Transformer (timm's `VisionTransformer`)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

INPUT_SIZE = 32


def _conv_block(index: int, cin: int, cout: int) -> list[tuple[str, nn.Module]]:
    return [
        (f"conv{index}", nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)),
        (f"bn{index}", nn.BatchNorm2d(cout)),
        (f"relu{index}", nn.ReLU()),
    ]


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32 -> 16 -> 8 px), global average pooling and a linear classifier.

    `features.relu3` is the last spatial feature map (128 x 8 x 8): the default layer for GradCAM.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                _conv_block(1, 3, width)
                + [("pool1", nn.MaxPool2d(2))]
                + _conv_block(2, width, 2 * width)
                + [("pool2", nn.MaxPool2d(2))]
                + _conv_block(3, 2 * width, 4 * width)
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN(num_classes)


def digits_vit(num_classes: int = 10) -> nn.Module:
    """ViT for 32 px: 4x4 patches (an 8x8 token grid plus a class token), width 64, 4 blocks of 4 heads."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=INPUT_SIZE,
        patch_size=4,
        in_chans=3,
        num_classes=num_classes,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        class_token=True,
        global_pool="token",
    )
