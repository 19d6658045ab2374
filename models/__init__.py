"""Model construction for backprop_hooks: torchvision, timm, a bundled real ImageNet model, digits networks.

`create(name)` returns a `Normalized` network in eval mode that takes pixel-space images in [0, 1] of
shape (B, 3, H, W) and carries `class_names`, `input_size`, `default_layer`, `arch`, `crop_pct` and
`interpolation`. Data flows downwards only: this package never imports `eval`.
"""

from .digits_data import digits
from backprop_hooks.errors import UnknownArchitectureError, WeightsMismatchError, WeightsUnavailableError
from .images import load_image, photo, photos
from .normalized import Normalized
from .zoo import available, create, imagenet_classes

__all__ = [
    "Normalized",
    "UnknownArchitectureError",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "available",
    "create",
    "digits",
    "imagenet_classes",
    "load_image",
    "photo",
    "photos",
]
