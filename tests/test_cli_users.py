"""The command line as users meet it: never lose data, never mislead, never crash.

Small models only (digits networks with seeded random checkpoints, 32 px); tiny synthetic image folders.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backprop_hooks import models
from backprop_hooks.cli import main
from backprop_hooks.eval import explain as ex


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for arch in ("digits_cnn", "digits_vit"):
        torch.manual_seed(0)
        paths[arch] = folder / f"{arch}.pt"
        torch.save(models.create(arch, pretrained=False).model.state_dict(), paths[arch])
    return paths


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def photo(size=(64, 48), seed=0) -> np.ndarray:
    """A smooth colour image (uint8, H x W x 3) with structure in every channel."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7.0 + c) * np.cos(yy / 5.0 - c) for c in range(3)], -1)
    return np.clip((base * 0.45 + 0.5) * 255 + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


# ---- 1. data loss ---------------------------------------------------------------------------------------


def test_explain_into_the_photos_own_folder_never_replaces_it(tmp_path, capsys, weights):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo()).save(folder / "photo.png")
    original = (folder / "photo.png").read_bytes()
    (folder / "photo.json").write_text('{"mine": true}')  # a user's own file with the output's name
    args = ["explain", folder / "photo.png", "--model", "digits_cnn", "--weights", weights["digits_cnn"]]
    code, stdout, stderr = cli(capsys, *args, "--out", folder)
    assert code == 0, stderr
    assert (folder / "photo.png").read_bytes() == original
    assert json.loads((folder / "photo.json").read_text()) == {"mine": True}
    assert {p.name for p in folder.iterdir()} == {
        "photo.png",
        "photo.json",
        "photo_2.png",
        "photo_2.pt",
        "photo_2.json",
    }
    first = (folder / "photo_2.json").stat().st_mtime_ns
    code, _, stderr = cli(capsys, *args, "--out", folder)  # a rerun replaces its own outputs, nothing else
    assert code == 0, stderr
    assert len(list(folder.iterdir())) == 5 and (folder / "photo_2.json").stat().st_mtime_ns >= first
    assert (folder / "photo.png").read_bytes() == original


# ---- 2. silently wrong results: layouts and image decoding ---------------------------------------------


def _class_folders(root: Path, classes=("cat", "dog"), per_class=2, seed=0):
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(photo((40, 40), seed + 10 * i + j)).save(root / name / f"{j}.png")


def test_finetune_layout_is_evaluated_on_its_val_split(tmp_path):
    from backprop_hooks.eval import datasets

    root = tmp_path / "data"
    _class_folders(root / "train", per_class=3)
    _class_folders(root / "val", per_class=2, seed=100)
    samples = datasets.folder(root, 32)
    assert samples.class_names == ["cat", "dog"] and len(samples) == 4  # val/, not train/ and val/ as classes
    assert all(name.startswith("val/") for name in samples.sample_names)
    plain = datasets.folder(root / "val", 32)
    assert plain.class_names == ["cat", "dog"] and len(plain) == 4
    lonely = tmp_path / "only_train"
    _class_folders(lonely / "train")
    with pytest.raises(datasets.DataSpecError, match="no val/ or test/"):
        datasets.folder(lonely, 32)


def test_perturb_on_the_folder_just_finetuned_uses_val_skips_corrupt_and_prints_headline(tmp_path, capsys, weights):
    root = tmp_path / "data"
    _class_folders(root / "train", classes=[str(i) for i in range(10)], per_class=1)
    _class_folders(root / "val", classes=[str(i) for i in range(10)], per_class=1, seed=50)
    (root / "val" / "3" / "broken.png").write_bytes(b"not a png")  # one corrupt image among good ones
    out = tmp_path / "perturb"
    code, stdout, stderr = cli(
        capsys,
        *("perturb", "--model", "digits_cnn", "--weights", weights["digits_cnn"], "--data", f"folder:{root}"),
        *(
            "--eps",
            "0.003",
            "--steps",
            "1",
            "--targets",
            "weighted",
            "logit",
            "--examples",
            "0",
            "--out",
            out,
            "--quiet",
        ),
    )
    assert code == 2  # the report is written, the exit code says a sample was left out
    assert "broken.png" in stderr and "1 of 11 samples could not be read" in stderr
    assert "n = 10 samples" in stdout and "Δacc" in stdout  # the headline table is printed
    names = [line.split(",")[2] for line in (out / "samples.csv").read_text().splitlines()[1:]]
    assert len(names) == 10 and all(n.startswith("val/") for n in names)  # val/, never train/ or "train" as a class
    mode = stat.S_IMODE((out / "results.md").stat().st_mode)
    assert mode == 0o666 & ~_umask()  # report files follow the umask, like the figures


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_16bit_png_and_float_tiff_load_like_their_8bit_twin(tmp_path):
    rgb = photo()
    grey8 = rgb[..., 0]
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # mode I;16
    Image.fromarray(grey8.astype(np.float32) / 255.0).save(tmp_path / "float.tif")  # mode F
    reference = models.load_image(tmp_path / "grey8.png", 32, crop_pct=1.0)
    for name in ("grey16.png", "float.tif"):
        loaded = models.load_image(tmp_path / name, 32, crop_pct=1.0)
        torch.testing.assert_close(loaded, reference, atol=1.5 / 255, rtol=0)
        assert 0.2 < float(loaded.mean()) < 0.8  # neither white nor black


def test_exif_rotated_jpeg_loads_upright(tmp_path):
    upright = photo((60, 40))
    Image.fromarray(upright).save(tmp_path / "upright.jpg", quality=95)
    stored = Image.fromarray(np.rot90(upright, k=-1).copy())  # the sensor's sideways pixels
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CW to view": viewers turn it back upright
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    a = models.load_image(tmp_path / "upright.jpg", 32, crop_pct=1.0)
    b = models.load_image(tmp_path / "phone.jpg", 32, crop_pct=1.0)
    assert (a - b).abs().mean() < 0.03
    c = models.load_image(Image.open(tmp_path / "phone.jpg"), 32, crop_pct=1.0)  # an opened PIL image too
    assert (a - c).abs().mean() < 0.03


def test_tiny_image_warns_once_in_words(tmp_path, capsys, weights):
    Image.fromarray(photo((12, 10))).save(tmp_path / "tiny.png")
    code, _, stderr = cli(
        capsys,
        "explain",
        tmp_path / "tiny.png",
        *"--model digits_cnn --weights".split(),
        weights["digits_cnn"],
        "--out",
        tmp_path / "o",
    )
    assert code == 0
    assert [line for line in stderr.splitlines() if line.startswith("warning:")] == [
        line for line in stderr.splitlines() if "upsampled" in line
    ]
    assert "12x10" in stderr and "Warning" not in stderr


# ---- 3. everything or nothing ---------------------------------------------------------------------------


def test_ctrl_c_keeps_the_images_already_explained(tmp_path, capsys, weights, monkeypatch):
    original, calls = ex.explain_classes, []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(ex, "explain_classes", interrupted_second)
    out = tmp_path / "o"
    code, _, stderr = cli(
        capsys,
        *"explain chelsea coffee rocket --model digits_cnn --weights".split(),
        weights["digits_cnn"],
        "--out",
        out,
    )
    assert code == 130 and "interrupted" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["chelsea.json", "chelsea.png", "chelsea.pt"]


# ---- 4. defaults that work on every bundled model --------------------------------------------------------


def test_vit_gets_a_vit_method_by_default(tmp_path, capsys, weights):
    out = tmp_path / "o"
    code, stdout, stderr = cli(
        capsys, "explain", "--model", "digits_vit", "--weights", weights["digits_vit"], "--out", out
    )
    assert code == 0, stderr
    assert json.loads((out / "chelsea.json").read_text())["method"] == "grad_rollout"
    code, _, stderr = cli(
        capsys,
        *"explain --model digits_vit --weights".split(),
        weights["digits_vit"],
        *"--method gradcam --out".split(),
        out,
    )
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "vision transformer" in stderr and "vit_gradcam" in stderr and "Normalized" not in stderr


@pytest.mark.slow
def test_mask_on_a_vit_uses_token_methods(tmp_path, capsys, weights):
    out = tmp_path / "mask"
    code, stdout, stderr = cli(
        capsys,
        *"mask --model digits_vit --weights".split(),
        weights["digits_vit"],
        *"--limit 6 --threshold 0 --baselines zeros --examples 0 --out".split(),
        out,
        "--quiet",
    )
    assert code == 0, stderr
    config = json.loads((out / "results.json").read_text())["config"]
    assert set(config["methods"]) == {"vit_gradcam", "grad_rollout"}
    assert "of 6 samples have p_2 > 0" in stdout  # the sample count is printed with the headline table


def test_topk_beyond_the_class_count_is_clamped_and_the_figure_capped(tmp_path, capsys, weights, monkeypatch):
    monkeypatch.setattr(ex, "DEFAULT_CHUNK", 4)  # explained in chunks: memory bounded for any --topk
    out = tmp_path / "o"
    code, stdout, stderr = cli(
        capsys,
        *"explain --model digits_cnn --weights".split(),
        weights["digits_cnn"],
        *"--topk 1000 --rows 3 --target weighted --out".split(),
        out,
    )
    assert code == 0, stderr
    assert "--topk 1000 exceeds the model's 10 classes" in stderr
    saved = torch.load(out / "chelsea.pt", weights_only=True)
    assert saved["maps"]["weighted"].shape == (10, 32, 32) and sorted(saved["classes"].tolist()) == list(range(10))
    from matplotlib import pyplot as plt

    height = plt.imread(out / "chelsea.png").shape[0]
    assert height < 1500  # 3 rows drawn (10 would take about 3000 px)


def test_class_names_from_the_checkpoint_folder_and_classes_by_name(tmp_path, capsys, weights):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "best.pt").write_bytes(weights["digits_cnn"].read_bytes())
    names = [f"digit {w}" for w in "zero one two three four five six seven eight nine".split()]
    (folder / "class_names.json").write_text(json.dumps(names))
    out = tmp_path / "o"
    code, stdout, stderr = cli(
        capsys,
        *"explain --model digits_cnn --weights".split(),
        folder / "best.pt",
        "--classes",
        "digit three",
        *"7 --target logit".split(),
        "versus:digit five",
        "--out",
        out,
    )
    assert code == 0, stderr
    info = json.loads((out / "chelsea.json").read_text())
    assert [c["index"] for c in info["classes"]] == [3, 7] and info["classes"][0]["name"] == "digit three"
    assert list(info["targets"]) == ["logit", "versus:5"] and "digit seven" in stdout
    code, _, stderr = cli(
        capsys, "explain", "--model", "digits_cnn", "--weights", folder / "best.pt", "--classes", "digit", "--out", out
    )
    assert code == 2 and "several classes" in stderr


def test_models_lists_classes_layers_and_fitting_methods(capsys):
    code, stdout, _ = cli(capsys, "models")
    assert code == 0 and "efficientnet_lite0" in stdout and "digits_vit" in stdout
    code, stdout, _ = cli(capsys, "models", "digits_vit", "--no-classes")
    assert code == 0
    fits = {
        line.split()[1]: line.split()[0] == "yes"
        for line in stdout.splitlines()
        if line.startswith("  ") and len(line.split()) > 2 and line.split()[0] in ("yes", "no")
    }
    assert fits["grad_rollout"] and fits["gradient"] and not fits["gradcam"] and not fits["guided_backprop"]
    assert "model.blocks.3.norm1" in stdout
    code, stdout, _ = cli(capsys, "models", "digits_cnn", "--no-layers")
    assert "guided_backprop" in stdout and "    9  9" in stdout
    code, listed, _ = cli(capsys, "explain", "--model", "digits_cnn", "--list")
    assert code == 0 and "model.features.relu3" in listed and "    9  9" in listed


# ---- 5. bad checkpoints and devices: one line, exit 2 -------------------------------------------------


def _bad_checkpoints(folder: Path, good: Path) -> dict:
    (folder / "text.pt").write_text("these are not weights\n")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "truncated.pt").write_bytes(good.read_bytes()[:2000])
    torch.manual_seed(0)
    torch.save(models.create("digits_cnn", pretrained=False).model, folder / "whole_model.pt")
    return {
        "text.pt": "not",
        "empty.pt": "empty",
        "truncated.pt": "truncated",
        "whole_model.pt": "state_dict()",
    }


def test_bad_checkpoints_and_meta_device_give_one_line(tmp_path, capsys, weights):
    cases = _bad_checkpoints(tmp_path, weights["digits_cnn"])
    for name, word in cases.items():
        code, stdout, stderr = cli(
            capsys, "explain", "--model", "digits_cnn", "--weights", tmp_path / name, "--out", tmp_path / "o"
        )
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and name in lines[0] and word in lines[0], (name, stderr)
    code, _, stderr = cli(capsys, "explain", "--model", "digits_cnn", "--device", "meta", "--out", tmp_path / "o")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "meta" in stderr
    assert not (tmp_path / "o").exists()


# ---- 8. figures -----------------------------------------------------------------------------------------


def test_figure_legend_follows_the_data_and_pixel_maps_are_readable(weights):
    from backprop_hooks.eval import plots

    model = models.create("digits_cnn", weights=weights["digits_cnn"])
    image = ex.load_source("chelsea", model)
    result = ex.explain_classes(model, image, "fullgrad", ["logit"], topk=2)  # FullGrad's default post: abs
    fig = ex.figure(result, "t")
    labels = [ax.get_xlabel() for ax in fig.axes]
    assert any("no sign" in label for label in labels) and not any("blue: against" in label for label in labels)
    grad = ex.explain_classes(model, image, "gradient", ["logit"], topk=2)
    fig = ex.figure(grad, "t")
    assert any("percentile" in ax.get_xlabel() for ax in fig.axes)
    heat = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "bwr"]
    assert heat and all(np.ndim(im.get_alpha()) == 2 for im in heat)  # opacity follows each pixel's strength
    maps = grad.maps("logit")
    assert heat[0].get_clim()[1] < float(maps.abs().max())  # clipped: the extremes do not set the scale
    assert plots.symmetric_limit(torch.tensor([0.0, 1.0, 100.0]), 50) < 100


def test_rollout_figure_says_it_is_class_independent(weights):
    model = models.create("digits_vit", weights=weights["digits_vit"])
    result = ex.explain_classes(model, ex.load_source("chelsea", model), "rollout", ["logit"], topk=2)
    assert "does not depend on the class" in ex.figure(result, "t")._suptitle.get_text()


def test_method_options_from_the_command_line(tmp_path, capsys, weights):
    common = ["explain", "--model", "digits_cnn", "--weights", weights["digits_cnn"], "--out", tmp_path / "o"]
    code, _, stderr = cli(capsys, *common, "--method", "integrated_gradients", "--option", "n_steps=4", "--topk", "1")
    assert code == 0, stderr
    code, _, stderr = cli(capsys, *common, "--method", "fullgrad", "--option", "post=signed", "--topk", "1")
    assert code == 0, stderr
    code, _, stderr = cli(capsys, *common, "--method", "gradcam", "--option", "steps=4")
    assert code == 2 and "relu" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = cli(capsys, *common, "--layer", "model.nope")  # messages in command-line words
    assert code == 2 and "module of digits_cnn" in stderr and "Normalized" not in stderr


# ---- 9. start-up, version ---------------------------------------------------------------------------------


def test_help_does_not_import_torchvision_timm_or_matplotlib():
    code = (
        "import sys\n"
        "from backprop_hooks.cli import main\n"
        "for argv in (['--help'], ['explain', '--help'], ['perturb', '--help'], ['mask', '--help'],"
        " ['finetune', '--help'], ['models', '--help'], ['explian']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torchvision', 'timm', 'matplotlib', 'scipy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_version(capsys):
    import backprop_hooks

    assert main(["--version"]) == 0
    assert backprop_hooks.__version__ in capsys.readouterr().out


def test_two_class_finetune_then_explain_with_its_names_and_defaults(tmp_path, capsys):
    """finetune on a tiny 2-class folder: it says it starts from scratch and writes metrics.csv; explain then
    reads class_names.json beside best.pt and clamps the default --topk 3 to the 2 classes."""
    data = tmp_path / "data"
    _class_folders(data / "train", per_class=2)
    _class_folders(data / "val", per_class=1, seed=7)
    run = tmp_path / "run"
    args = ["finetune", "--arch", "digits_cnn", "--data", f"folder:{data}", "--batch-size", "4", "--out", run]
    code, _, stderr = cli(capsys, *args, "--epochs", "1", "--quiet")
    assert code == 0, stderr
    assert "training digits_cnn for 2 classes from random init" in stderr
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,loss,val_acc,seconds" and len(rows) == 2
    code, _, stderr = cli(capsys, *args, "--epochs", "2", "--quiet")
    assert code == 0 and "resuming digits_cnn" in stderr and len((run / "metrics.csv").read_text().splitlines()) == 3
    code, stdout, stderr = cli(
        capsys,
        *"explain --model digits_cnn --weights".split(),
        run / "best.pt",
        *"--classes dog --target logit versus:cat --out".split(),
        tmp_path / "o1",
    )
    assert code == 0, stderr
    code, stdout, stderr = cli(
        capsys, "explain", "--model", "digits_cnn", "--weights", run / "best.pt", "--out", tmp_path / "o"
    )
    assert code == 0, stderr
    info = json.loads((tmp_path / "o" / "chelsea.json").read_text())
    assert sorted(c["name"] for c in info["classes"]) == ["cat", "dog"] and "exceeds" in stderr
    code, stdout, _ = cli(capsys, "finetune", "--help")
    assert "(default: 0.001)" in stdout and "(default: 200)" in stdout


def test_progress_shows_during_one_long_explanation(weights, capsys, monkeypatch):
    import time

    original = ex.bh.explain

    def slow(*args, **kwargs):
        time.sleep(3.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(ex.bh, "explain", slow)
    model = models.create("digits_cnn", weights=weights["digits_cnn"])
    ex.explain_classes(model, ex.load_source("chelsea", model), "gradient", ["logit"], topk=1, progress=True)
    err = capsys.readouterr().err
    assert "gradient" in err and "0/1" in err  # one call, yet the bar shows (and its clock moves) while it runs
