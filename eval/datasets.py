"""Data sets for the experiments, as pixel-space tensors in [0, 1].

- `digits(split, size)`: the scikit-learn digits, stratified 75/25 train/test split with seed 0
  (1347/450 images), upsampled bilinearly to `size` and repeated to 3 channels (see `models.digits_data`).
- `photos(size)`: the colour photos bundled with scikit-image (chelsea, coffee, astronaut, rocket).
- `load_image(path_or_array, size)`: one photo, resized and centre-cropped.
"""
from models import digits, load_image, photos
from models.digits_data import CLASS_NAMES as DIGITS_CLASS_NAMES

__all__ = ["DIGITS_CLASS_NAMES", "digits", "load_image", "photos"]
