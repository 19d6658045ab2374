"""Data sets for the experiments, as pixel-space tensors in [0, 1].

- `digits(split, size)`: the scikit-learn digits, stratified 75/25 train/test split with seed 0
  (1347/450 images), upsampled bilinearly to `size` and repeated to 3 channels (see `models.digits_data`).
- `photos(size)`: the colour photos bundled with scikit-image (chelsea, coffee, astronaut, rocket).
- `load_image(path_or_array, size)`: one photo, resized and centre-cropped.

Evaluation sets named on the command line (`from_spec`), each a :class:`SampleSet` of (image, label):

============== ====================================================================================
``imagenet:P`` ILSVRC2012 validation. Images ``ILSVRC2012_val_*.JPEG`` in ``P``, ``P/val`` or
               ``P/ILSVRC/Data/CLS-LOC/val``; labels from either Kaggle's ``P/LOC_val_solution.csv``
               (first synset of ``PredictionString``) or the devkit's
               ``P/ILSVRC2012_validation_ground_truth.txt`` (ILSVRC2012 ids, one per image in file
               order) together with ``P/meta.mat`` (ids to synsets). Class index = position of the
               synset in sorted order (torchvision's order). Transform: Resize(256) → CenterCrop(224)
               (generally Resize(⌊s/0.875⌋) → CenterCrop(s) for the model's input size s).
``cub:P``      CUB-200-2011 test split (``models.data.cub``: images.txt, image_class_labels.txt,
               train_test_split.txt, images/); transform Resize((s, s)).
``food101:P``  Food-101 test split: ``P/meta/classes.txt``, ``P/meta/test.txt`` (``class/id`` lines),
               ``P/images/class/id.jpg``; transform Resize(⌊s/0.875⌋) → CenterCrop(s).
``folder:P``   any torchvision ImageFolder ``P/<class>/*``, or the layout ``finetune`` reads (``P/train/``,
               ``P/val/`` or ``P/test/``), of which ``val/`` (else ``test/``) is evaluated; images decoded
               as a photo viewer shows them; transform Resize(⌊s/0.875⌋) → CenterCrop(s).
``digits``     the held-out digits test split (450 images, 32 px).
``photos``     the four bundled photos, with the model's own resize-and-crop. They have no ground
               truth: the label is -1 and the experiments use the model's prediction as t.
============== ====================================================================================
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

from backprop_hooks.models import digits, load_image, photos
from backprop_hooks.models.data import DataSpecError, ImageListDataset
from backprop_hooks.models.data import cub as _cub_splits
from backprop_hooks.models.digits_data import CLASS_NAMES as DIGITS_CLASS_NAMES

__all__ = [
    "DIGITS_CLASS_NAMES",
    "NO_LABEL",
    "SPEC_HELP",
    "SampleSet",
    "DataSpecError",
    "center_crop_transform",
    "cub_test",
    "digits",
    "digits_test",
    "folder",
    "food101",
    "from_spec",
    "imagenet_val",
    "load_image",
    "photo_set",
    "photos",
]

#: The label of samples without ground truth (photos): the experiments use the prediction.
NO_LABEL = -1
IMAGENET_CROP_PCT = 0.875  # Resize(256) -> CenterCrop(224)
#: The data specifications ``from_spec`` accepts, as the command line's help lists them.
SPEC_HELP = "imagenet:PATH, cub:PATH, food101:PATH, folder:PATH, digits or photos"


@dataclass
class SampleSet:
    """An evaluation set: ``dataset[i] -> (image (3, s, s) in [0, 1], label)`` and its class names.

    ``labelled=False`` means every label is :data:`NO_LABEL` and t is the model's prediction.
    """

    dataset: Dataset
    class_names: Optional[List[str]]  # None: the classes are the model's (ImageNet folders, photos)
    name: str
    labelled: bool = True
    sample_names: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.dataset)


def center_crop_transform(size: int, crop_pct: float = IMAGENET_CROP_PCT, interpolation: str = "bilinear") -> Callable:
    """Resize the shorter side to ⌊size / crop_pct⌋, centre-crop ``size`` × ``size``, to [0, 1] tensor."""
    from torchvision import transforms

    mode = transforms.InterpolationMode(interpolation)
    return transforms.Compose(
        [
            transforms.Resize(math.floor(size / crop_pct), interpolation=mode),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
        ]
    )


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataSpecError(f"missing {what}: {path}")
    return path


# ---- ImageNet validation -----------------------------------------------------------------------------

_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)


def _imagenet_image_dir(root: Path) -> Path:
    for folder in (root, root / "val", root / "ILSVRC" / "Data" / "CLS-LOC" / "val"):
        if folder.is_dir() and any(_VAL_NAME.search(p.name) for p in folder.iterdir()):
            return folder
    raise DataSpecError(f"no ILSVRC2012_val_*.JPEG images in {root}, {root}/val or {root}/ILSVRC/Data/CLS-LOC/val")


def _imagenet_synsets_by_image(root: Path, images: Sequence[str]) -> List[str]:
    """The ground-truth synset (``n01440764``) of every image stem ``ILSVRC2012_val_00000001``."""
    kaggle = root / "LOC_val_solution.csv"
    if kaggle.is_file():
        with kaggle.open(newline="") as handle:
            truth = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(handle)}
    else:
        devkit = root / "ILSVRC2012_validation_ground_truth.txt"
        if not devkit.is_file():
            raise DataSpecError(f"{root} holds neither LOC_val_solution.csv nor ILSVRC2012_validation_ground_truth.txt")
        from scipy.io import loadmat

        meta = loadmat(str(_require(root / "meta.mat", "devkit meta.mat (ILSVRC2012 ids to synsets)")), squeeze_me=True)
        wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta["synsets"]}
        ids = [int(v) for v in devkit.read_text().split()]
        truth = {f"ILSVRC2012_val_{i + 1:08d}": wnid[v] for i, v in enumerate(ids)}
    missing = [s for s in images if s not in truth]
    if missing:
        raise DataSpecError(f"no ground truth for {len(missing)} image(s), e.g. {missing[0]}")
    return [truth[s] for s in images]


def _imagenet_synset_order(root: Path, found: Sequence[str]) -> List[str]:
    """All 1000 synsets in class-index order (sorted): LOC_synset_mapping.txt, meta.mat, else those found."""
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        return sorted(line.split()[0] for line in mapping.read_text().splitlines() if line.strip())
    if (root / "meta.mat").is_file():
        from scipy.io import loadmat

        synsets = loadmat(str(root / "meta.mat"), squeeze_me=True)["synsets"]
        return sorted(str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0)
    return sorted(set(found))


def imagenet_val(root: str | Path, size: int = 224) -> SampleSet:
    """ILSVRC2012 validation images with their ground truth (layouts: see the module docstring)."""
    root = Path(root)
    folder = _imagenet_image_dir(root)
    paths = sorted(p for p in folder.iterdir() if _VAL_NAME.search(p.name))
    stems = [p.stem for p in paths]
    synsets = _imagenet_synsets_by_image(root, stems)
    order = _imagenet_synset_order(root, synsets)
    if len(order) != 1000:
        raise DataSpecError(f"{root}: found {len(order)} synsets, not 1000; add LOC_synset_mapping.txt or meta.mat")
    index = {s: i for i, s in enumerate(order)}
    labels = [index[s] for s in synsets]
    return SampleSet(
        ImageListDataset(paths, labels, center_crop_transform(size)), None, f"imagenet:{root}", sample_names=stems
    )


# ---- CUB-200-2011, Food-101, ImageFolder ------------------------------------------------------------


def cub_test(root: str | Path, size: int = 224) -> SampleSet:
    """CUB-200-2011's test split with the test transform Resize((size, size)) (reader: ``models.data.cub``)."""
    splits = _cub_splits(root, size)
    names = [Path(p).stem for p in splits.val.paths]
    return SampleSet(splits.val, splits.class_names, f"cub:{root}", sample_names=names)


def food101(root: str | Path, size: int = 224) -> SampleSet:
    """Food-101's test split (``meta/test.txt``), classes in ``meta/classes.txt`` order."""
    root = Path(root)
    classes = [
        c.strip()
        for c in _require(root / "meta" / "classes.txt", "Food-101 meta/classes.txt").read_text().splitlines()
        if c.strip()
    ]
    index = {c: i for i, c in enumerate(classes)}
    entries = [
        e.strip()
        for e in _require(root / "meta" / "test.txt", "Food-101 meta/test.txt").read_text().splitlines()
        if e.strip()
    ]
    bad = [e for e in entries if e.split("/")[0] not in index]
    if bad:
        raise DataSpecError(f"{root}/meta/test.txt: class of {bad[0]!r} is not in meta/classes.txt")
    paths = [root / "images" / f"{e}.jpg" for e in entries]
    labels = [index[e.split("/")[0]] for e in entries]
    return SampleSet(
        ImageListDataset(paths, labels, center_crop_transform(size)), classes, f"food101:{root}", sample_names=entries
    )


def evaluation_folder(root: Path) -> Path:
    """The class folders to evaluate in ``root``: ``root`` itself (``root/<class>/<image>``), or, for the
    layout ``finetune`` reads (``root/train/<class>``, ``root/val/<class>`` or ``root/test/<class>``), its
    ``val/`` (else ``test/``) split: never the training images, never ``train``/``val`` taken as classes."""
    splits = [name for name in ("val", "test") if (root / name).is_dir()]
    if splits and ((root / "train").is_dir() or len(splits) == 2 or len(list(root.iterdir())) == 1):
        return root / splits[0]
    if (root / "train").is_dir():
        raise DataSpecError(
            f"{root} holds train/ but no val/ or test/ split: evaluating the training images would overstate "
            f"the results; give folder:{root}/val (a held-out split, one folder per class)"
        )
    return root


def folder(root: str | Path, size: int = 224) -> SampleSet:
    """Class folders ``root/<class>/<image>``, classes in sorted folder order; for the fine-tuning layout
    (``root/train/``, ``root/val/``) the ``val/`` (else ``test/``) split (``evaluation_folder``)."""
    from torchvision import datasets as tv_datasets

    from backprop_hooks.models.images import open_rgb

    root = Path(root)
    if not root.is_dir():
        raise DataSpecError(f"folder {root} does not exist")
    images = evaluation_folder(root)
    try:
        data = tv_datasets.ImageFolder(str(images), transform=center_crop_transform(size), loader=open_rgb)
    except (FileNotFoundError, RuntimeError) as error:
        raise DataSpecError(f"{images} is not an ImageFolder (<class>/<image> files): {error}") from None
    names = [str(Path(p).relative_to(root).with_suffix("")) for p, _ in data.samples]
    return SampleSet(data, list(data.classes), f"folder:{root}", sample_names=names)


# ---- bundled data ------------------------------------------------------------------------------------


def digits_test(size: int = 32) -> SampleSet:
    """The held-out digits test split (450 images)."""
    images, labels = digits("test", size)
    return SampleSet(TensorDataset(images, labels), list(DIGITS_CLASS_NAMES), "digits")


def photo_set(size: int = 224, crop_pct: float = IMAGENET_CROP_PCT, interpolation: str = "bilinear") -> SampleSet:
    """The bundled photos, unlabelled (label :data:`NO_LABEL`: t is the model's prediction)."""
    images = photos(size, crop_pct=crop_pct, interpolation=interpolation)
    stacked = torch.stack(list(images.values()))
    labels = torch.full((len(images),), NO_LABEL, dtype=torch.long)
    return SampleSet(TensorDataset(stacked, labels), None, "photos", labelled=False, sample_names=list(images))


def from_spec(
    spec: str, size: int = 224, crop_pct: float = IMAGENET_CROP_PCT, interpolation: str = "bilinear"
) -> SampleSet:
    """The evaluation set named by ``spec`` (``imagenet:PATH`` ... ``photos``) at input size ``size``.

    ``crop_pct``/``interpolation`` only apply to the photos (the model's own preprocessing); the data
    sets use the paper's transforms.
    """
    kind, _, path = spec.partition(":")
    readers = {"imagenet": imagenet_val, "cub": cub_test, "food101": food101, "folder": folder}
    if kind in readers and path:
        return readers[kind](path, size)
    if kind == "digits" and not path:
        return digits_test(size)
    if kind == "photos" and not path:
        return photo_set(size, crop_pct, interpolation)
    raise DataSpecError(f"unknown data {spec!r}; expected {SPEC_HELP}")
