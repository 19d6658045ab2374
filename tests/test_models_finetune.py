"""Fine-tuning: exact resume, data layouts, the command line."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from backprop_hooks.models import data, finetune_command
from backprop_hooks.models import finetune as finetune_module
from backprop_hooks.errors import OptionError, ResumeError
from backprop_hooks.models.finetune import finetune
from backprop_hooks.models.digits_data import digits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks train faster on one thread, above all on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_digits():
    x, y = digits("train")
    return (x[:40], y[:40]), (x[40:56], y[40:56])


def _run(tiny, out_dir, epochs, **kwargs):
    train, val = tiny
    options = dict(
        batch_size=16, lr=0.05, augment_shift=1, progress=False, out_dir=out_dir, class_names=list("0123456789")
    )
    return finetune("digits_cnn", train, val, epochs=epochs, **{**options, **kwargs})


def test_resumed_run_ends_with_exactly_the_weights_of_a_straight_run(tiny_digits, tmp_path):
    straight = _run(tiny_digits, tmp_path / "straight", 3)
    _run(tiny_digits, tmp_path / "resumed", 2)
    resumed = _run(tiny_digits, tmp_path / "resumed", 3)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    last = [torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "straight", tmp_path / "resumed")]
    for a, b in zip(last[0]["optimizer"]["state"].values(), last[1]["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert set(last[0]) == {"model", "optimizer", "epoch", "best_acc", "rng", "config", "history"}
    best = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)
    assert set(best) == set(straight.model.model.state_dict())
    assert json.loads((tmp_path / "straight" / "class_names.json").read_text()) == list("0123456789")


def test_resume_with_other_settings_is_refused(tiny_digits, tmp_path):
    _run(tiny_digits, tmp_path, 1)
    with pytest.raises(ResumeError, match="lr"):
        _run(tiny_digits, tmp_path, 2, lr=0.1)
    assert len(_run(tiny_digits, tmp_path, 1, lr=0.1, resume=False).history) == 1


def test_cosine_schedule_with_warmup():
    factors = [finetune_module.lr_factor("cosine", s, 10, 2) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] > 0
    assert factors[2:] == sorted(factors[2:], reverse=True)
    with pytest.raises(OptionError, match="lr_schedule"):
        finetune_module.FinetuneConfig(lr_schedule="step")


def test_config_is_the_recipe_and_keywords_update_it(tiny_digits, tmp_path):
    config = finetune_module.FinetuneConfig(epochs=1, batch_size=16, lr=0.05)
    assert finetune_module.FinetuneConfig().lr == 1e-3 and finetune_module.FinetuneConfig().epochs == 200
    assert config.updated(lr=0.1) == finetune_module.FinetuneConfig(epochs=1, batch_size=16, lr=0.1)
    with pytest.raises(OptionError, match="unknown finetune option.*'lrr'"):
        config.updated(lrr=0.1)
    (x, y), val = tiny_digits
    result = finetune("digits_cnn", (x, y), val, config, out_dir=tmp_path, progress=False, epochs=2)
    assert len(result.history) == 2
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["config"]
    assert saved["lr"] == 0.05 and saved["batch_size"] == 16


def test_tensor_pairs_are_checked(tiny_digits, tmp_path):
    (x, y), val = tiny_digits
    with pytest.raises(ValueError, match="int64"):
        finetune("digits_cnn", (x, y.float()), val, epochs=1, out_dir=tmp_path, progress=False)


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(path)


def test_cub_layout(tmp_path):
    rows = [
        (1, "001.Black_footed_Albatross/a.png", 1, 1),
        (2, "001.Black_footed_Albatross/b.png", 1, 0),
        (3, "002.Laysan_Albatross/c.png", 2, 1),
        (4, "002.Laysan_Albatross/d.png", 2, 0),
    ]
    for _, rel, label, _ in rows:
        _png(tmp_path / "images" / rel, 60 * label)
    (tmp_path / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (tmp_path / "image_class_labels.txt").write_text("".join(f"{i} {label}\n" for i, _, label, _ in rows))
    (tmp_path / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (tmp_path / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    splits = data.from_spec(f"cub:{tmp_path}", 24)
    assert splits.class_names == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    assert len(splits.train) == len(splits.val) == 2
    image, label = splits.val[1]
    assert image.shape == (3, 24, 24) and label == 1 and torch.allclose(image, torch.full_like(image, 120 / 255))
    assert [label for _, label in splits.train] == [0, 1]


def test_image_folder_layout_and_command_line(tmp_path):
    for split in ("train", "test"):
        for label, name in enumerate(("cat", "dog")):
            for k in range(3):
                _png(tmp_path / "data" / split / name / f"{k}.png", 40 * label + k)
    splits = data.from_spec(f"folder:{tmp_path / 'data'}", 32)
    assert splits.class_names == ["cat", "dog"] and len(splits.train) == len(splits.val) == 6

    parser = argparse.ArgumentParser(prog="backprop-hooks")
    finetune_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "finetune",
            "--arch",
            "digits_cnn",
            "--data",
            f"folder:{tmp_path / 'data'}",
            "--out",
            str(tmp_path / "out"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    assert json.loads((tmp_path / "out" / "class_names.json").read_text()) == ["cat", "dog"]
    assert (tmp_path / "out" / "best.pt").is_file()


@pytest.mark.parametrize("spec", ["imagenet", "cub:", "folder"])
def test_bad_data_spec(spec):
    with pytest.raises(data.DataSpecError, match="digits"):
        data.from_spec(spec, 32)


def test_folder_without_validation_split(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png", 0)
    with pytest.raises(data.DataSpecError, match="val/"):
        data.image_folder(tmp_path)


def test_start_from_a_local_checkpoint_with_a_new_head(tiny_digits, tmp_path):
    from backprop_hooks.models.zoo import WEIGHTS_DIR

    (x, y), (vx, vy) = tiny_digits
    result = finetune(
        "digits_cnn",
        (x, y % 2),
        (vx, vy % 2),
        epochs=0,
        out_dir=tmp_path,
        progress=False,
        weights=WEIGHTS_DIR / "digits_cnn.pt",
    )
    shipped = torch.load(WEIGHTS_DIR / "digits_cnn.pt", weights_only=True)
    assert torch.equal(result.model.model.features.conv3.weight, shipped["features.conv3.weight"])
    assert result.model.model.classifier.out_features == 2 and result.model.class_names == ["0", "1"]
