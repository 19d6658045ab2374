"""Training data sources for `models.finetune`: CUB-200-2011, an ImageFolder tree, the digits, tensors.

Image transforms follow the paper: training RandomResizedCrop(size) + RandomHorizontalFlip, test
Resize((size, size)); both end in pixel-space tensors in [0, 1] (normalisation lives in the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

from backprop_hooks.errors import DataSpecError

from . import digits_data
from .images import open_rgb

DATA_SPEC_HELP = "cub:PATH (CUB_200_2011 folder), folder:PATH (ImageFolder with train/ and val/ or test/), or digits"


@dataclass
class DataSplits:
    """A training and a validation set of (pixel image, label) pairs, and the class names."""

    train: Dataset
    val: Dataset
    class_names: list[str]


def train_transform(size: int):
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )


def test_transform(size: int):
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])


class ImageListDataset(Dataset):
    """Images read from a list of files, with integer labels."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_rgb(self.paths[index])), self.labels[index]


def _read_table(path: Path) -> dict[int, str]:
    """A CUB metadata file: lines "<id> <value>" -> {id: value}."""
    if not path.is_file():
        raise DataSpecError(f"missing CUB file {path}")
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            key, _, value = line.strip().partition(" ")
            if not key.isdigit() or not value:
                raise DataSpecError(f"{path}:{number}: expected '<id> <value>', got {line!r}")
            table[int(key)] = value.strip()
    return table


def cub(root: str | Path, size: int = 224) -> DataSplits:
    """CUB-200-2011 at `root` (images.txt, image_class_labels.txt, train_test_split.txt, images/; classes.txt
    optional) split by train_test_split.txt. Labels in the files are 1-based; here they are 0-based."""
    root = Path(root)
    images = _read_table(root / "images.txt")
    labels = {k: int(v) - 1 for k, v in _read_table(root / "image_class_labels.txt").items()}
    is_train = {k: v == "1" for k, v in _read_table(root / "train_test_split.txt").items()}
    if not images.keys() == labels.keys() == is_train.keys():
        raise DataSpecError(f"{root}: images.txt, image_class_labels.txt and train_test_split.txt list different ids")
    num_classes = max(labels.values()) + 1
    classes_file = root / "classes.txt"
    names = _read_table(classes_file) if classes_file.is_file() else {}
    class_names = [names.get(i + 1, str(i)) for i in range(num_classes)]

    def split(train: bool, transform) -> ImageListDataset:
        ids = sorted(k for k in images if is_train[k] == train)
        return ImageListDataset([root / "images" / images[k] for k in ids], [labels[k] for k in ids], transform)

    return DataSplits(split(True, train_transform(size)), split(False, test_transform(size)), class_names)


def image_folder(root: str | Path, size: int = 224) -> DataSplits:
    """A torchvision ImageFolder tree: `root/train/<class>/*` and `root/val/<class>/*` (or `root/test/`)."""
    root = Path(root)
    val_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise DataSpecError(f"{root} must contain train/ and val/ (or test/) class folders")
    from torchvision import datasets

    train = datasets.ImageFolder(root / "train", transform=train_transform(size), loader=open_rgb)
    val = datasets.ImageFolder(val_dir, transform=test_transform(size), loader=open_rgb)
    if train.classes != val.classes:
        raise DataSpecError(f"{root}: train/ and {val_dir.name}/ hold different class folders")
    return DataSplits(train, val, list(train.classes))


def digits(size: int = 32) -> DataSplits:
    """The scikit-learn digits: training split for training, test split for validation."""
    return DataSplits(
        TensorDataset(*digits_data.digits("train", size)),
        TensorDataset(*digits_data.digits("test", size)),
        list(digits_data.CLASS_NAMES),
    )


def from_spec(spec: str, size: int) -> DataSplits:
    """Parse a `--data` value: "cub:PATH", "folder:PATH" or "digits"."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return digits(size)
    if kind in ("cub", "folder") and path:
        return (cub if kind == "cub" else image_folder)(path, size)
    raise DataSpecError(f"unknown data {spec!r}; expected {DATA_SPEC_HELP}")
