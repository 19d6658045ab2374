"""Every evaluation-set layout on a tiny generated folder of 8x8 images, plus the bundled sets."""

import numpy as np
import pytest
import torch
from PIL import Image

from backprop_hooks.eval import datasets


def _image(path, value: int, size=(8, 8), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, (value, 0, 255 - value) if mode == "RGB" else value).save(path)


def _check(sample_set, n: int, size: int = 8) -> None:
    assert len(sample_set) == n
    for i in range(n):
        x, label = sample_set.dataset[i]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 1


SYNSETS = [f"n{i:08d}" for i in range(1000)]


def test_imagenet_kaggle_layout(tmp_path):
    for i in (1, 2, 3):
        _image(tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", 40 * i, (10, 12))
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "".join(f"{s} name {i}\n" for i, s in enumerate(reversed(SYNSETS)))
    )
    truth = {1: 5, 2: 999, 3: 0}
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        + "".join(f"ILSVRC2012_val_{i:08d},{SYNSETS[c]} 1 2 3 4 {SYNSETS[c]} 5 6 7 8\n" for i, c in truth.items())
    )
    data = datasets.from_spec(f"imagenet:{tmp_path}", 8)
    _check(data, 3)
    assert [int(data.dataset[i][1]) for i in range(3)] == [5, 999, 0]  # sorted synset order, not file order
    assert data.sample_names == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002", "ILSVRC2012_val_00000003"]
    assert data.class_names is None and data.labelled


def test_imagenet_devkit_layout(tmp_path):
    from scipy.io import savemat

    ids = np.arange(1, 1001)
    wnids = [SYNSETS[(7 * i) % 1000] for i in range(1000)]  # ILSVRC2012 ids are not the sorted order
    synsets = np.zeros(1000, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i in range(1000):
        synsets[i] = (ids[i], wnids[i], 0)
    savemat(tmp_path / "meta.mat", {"synsets": synsets})
    for i in (1, 2):
        _image(tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG", 100)
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n3\n")
    data = datasets.from_spec(f"imagenet:{tmp_path}", 8)
    _check(data, 2)
    assert [int(data.dataset[i][1]) for i in range(2)] == [SYNSETS.index(wnids[0]), SYNSETS.index(wnids[2])]


def test_imagenet_errors(tmp_path):
    with pytest.raises(datasets.DataSpecError, match="no ILSVRC2012_val"):
        datasets.from_spec(f"imagenet:{tmp_path}", 8)
    _image(tmp_path / "ILSVRC2012_val_00000001.JPEG", 1)
    with pytest.raises(datasets.DataSpecError, match="neither LOC_val_solution.csv"):
        datasets.from_spec(f"imagenet:{tmp_path}", 8)


def test_cub_test_split(tmp_path):
    files = {1: "001.A/a.jpg", 2: "001.A/b.jpg", 3: "002.B/c.jpg", 4: "002.B/d.jpg"}
    for key, name in files.items():
        _image(tmp_path / "images" / name, 30 * key, (12, 9))
    (tmp_path / "images.txt").write_text("".join(f"{k} {v}\n" for k, v in files.items()))
    (tmp_path / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n4 2\n")
    (tmp_path / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    (tmp_path / "classes.txt").write_text("1 001.A\n2 002.B\n")
    data = datasets.from_spec(f"cub:{tmp_path}", 8)
    _check(data, 2)  # Resize((8, 8)) of a 12x9 image: no crop
    assert [int(data.dataset[i][1]) for i in range(2)] == [0, 1]
    assert data.class_names == ["001.A", "002.B"] and data.sample_names == ["b", "d"]


def test_food101_test_split(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "classes.txt").write_text("apple_pie\nbaklava\n")
    (tmp_path / "meta" / "test.txt").write_text("baklava/11\napple_pie/7\n")
    (tmp_path / "meta" / "train.txt").write_text("apple_pie/1\n")
    for name in ("baklava/11", "apple_pie/7", "apple_pie/1"):
        _image(tmp_path / "images" / f"{name}.jpg", 80, (9, 14))
    data = datasets.from_spec(f"food101:{tmp_path}", 8)
    _check(data, 2)
    assert [int(data.dataset[i][1]) for i in range(2)] == [1, 0]
    assert data.class_names == ["apple_pie", "baklava"]
    (tmp_path / "meta" / "test.txt").write_text("pizza/1\n")
    with pytest.raises(datasets.DataSpecError, match="not in meta/classes.txt"):
        datasets.from_spec(f"food101:{tmp_path}", 8)


def test_image_folder(tmp_path):
    _image(tmp_path / "cat" / "a.png", 10)
    _image(tmp_path / "dog" / "b.png", 200, mode="L")
    data = datasets.from_spec(f"folder:{tmp_path}", 8)
    _check(data, 2)
    assert data.class_names == ["cat", "dog"] and [int(data.dataset[i][1]) for i in range(2)] == [0, 1]
    with pytest.raises(datasets.DataSpecError, match="does not exist"):
        datasets.from_spec(f"folder:{tmp_path / 'missing'}", 8)


def test_bundled_sets_and_bad_specs():
    digits = datasets.from_spec("digits", 32)
    assert len(digits) == 450 and digits.class_names == [str(d) for d in range(10)]
    photos = datasets.from_spec("photos", 16)
    _check(photos, 4, 16)
    assert not photos.labelled and all(int(photos.dataset[i][1]) == datasets.NO_LABEL for i in range(4))
    for spec in ("mnist", "cub", "digits:x", "photos:y"):
        with pytest.raises(datasets.DataSpecError, match="unknown data"):
            datasets.from_spec(spec, 8)
