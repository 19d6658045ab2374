"""`backprop-hooks explain`: outputs (figure, tensors, summary, table), batching, bad input, plots.

Most tests use a small `digits_cnn` (32 px, 10 classes; a seeded random checkpoint, so they need no
shipped weights) on the bundled photos; the real EfficientNet-Lite0 run on the cat photo is marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import pyplot as plt
from PIL import Image

import backprop_hooks as bh
from backprop_hooks import models
from backprop_hooks.cli import main
from backprop_hooks.eval import explain as ex
from backprop_hooks.eval import plots


def _checkpoint(folder: Path, arch: str) -> Path:
    torch.manual_seed(0)
    path = folder / f"{arch}_random.pt"
    torch.save(models.create(arch, pretrained=False).model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("weights")
    return {arch: _checkpoint(folder, arch) for arch in ("digits_cnn", "digits_vit")}


@pytest.fixture
def small(weights) -> list:
    """Command-line options selecting the small model."""
    return ["--model", "digits_cnn", "--weights", str(weights["digits_cnn"])]


def run_cli(capsys, *argv: str):
    code = main(["explain", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def photo_files(tmp_path: Path):
    """Two real photos saved as files with the same stem in different folders."""
    import skimage.data

    paths = []
    for folder, array in (("a", skimage.data.chelsea()), ("b", skimage.data.coffee())):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "photo.png")
        Image.fromarray(array).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def small_model(weights):
    return models.create("digits_cnn", weights=weights["digits_cnn"])


def test_default_outputs(tmp_path, capsys, small, small_model):
    out = tmp_path / "out" / "explain"
    code, stdout, stderr = run_cli(capsys, *small, "--out", str(out))
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["chelsea.json", "chelsea.png", "chelsea.pt"]
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]

    x = ex.load_source("chelsea", small_model)
    with torch.no_grad():
        logits = small_model(x[None])[0]
    top = logits.topk(3).indices

    saved = torch.load(out / "chelsea.pt", weights_only=True)
    assert saved["targets"] == ["logit", "weighted"] and saved["method"] == "gradcam"
    assert saved["layer"] == small_model.default_layer
    assert torch.equal(saved["classes"], top)
    assert saved["class_names"] == [small_model.class_names[c] for c in top.tolist()]
    torch.testing.assert_close(saved["logits"], logits)
    for key in ("logit", "weighted"):
        assert saved["maps"][key].shape == (3, 32, 32)
        assert saved["attributions"][key].shape == (3, 8, 8)  # the 8x8 grid of features.relu3

    info = json.loads((out / "chelsea.json").read_text())
    assert (info["image"], info["model"], info["method"]) == ("chelsea", "digits_cnn", "gradcam")
    assert [c["index"] for c in info["classes"]] == top.tolist() and [c["rank"] for c in info["classes"]] == [1, 2, 3]
    probs = [c["probability"] for c in info["classes"]]
    assert probs == sorted(probs, reverse=True)
    np.testing.assert_allclose(probs, logits.softmax(0)[top].numpy(), rtol=1e-5)
    for key, target in info["targets"].items():
        maps = saved["maps"][key].double()
        np.testing.assert_allclose(
            [c["positive_sum"] for c in target["per_class"]], maps.clamp(min=0).sum((1, 2)), rtol=1e-6
        )
        np.testing.assert_allclose(
            [c["negative_sum"] for c in target["per_class"]], maps.clamp(max=0).sum((1, 2)), rtol=1e-6
        )
        assert np.allclose(np.diag(target["class_similarity"]), 1.0)
    weighted = info["targets"]["weighted"]["per_class"][0]["objective"]
    alpha = logits.scatter(0, top[:1], float("-inf")).softmax(0)
    assert weighted == pytest.approx(float(logits[top[0]] - (alpha * logits).sum()), rel=1e-5)

    image = plt.imread(out / "chelsea.png")
    assert image.ndim == 3 and 600 < image.shape[0] < 1600 and 600 < image.shape[1] < 1600
    assert "rank" in stdout and "class name" in stdout and "gradcam" in stdout
    assert all(f"{c:>5}" in stdout for c in top.tolist())
    assert stderr == ""


def test_one_batched_call_per_target(tmp_path, capsys, monkeypatch, small, small_model):
    calls = []
    original = bh.explain

    def counting(model, x, **kw):
        calls.append((x.shape[0], kw["target"], kw["classes"].tolist()))
        return original(model, x, **kw)

    monkeypatch.setattr(ex.bh, "explain", counting)
    out = tmp_path / "o"
    targets = ["logit", "weighted", "versus:1", "mean"]
    code, stdout, stderr = run_cli(capsys, *small, "--classes", "3", "5", "--target", *targets, "--out", str(out))
    assert code == 0, stderr
    assert calls == [(2, t, [3, 5]) for t in targets]

    saved = torch.load(out / "chelsea.pt", weights_only=True)
    assert saved["targets"] == targets and list(saved["maps"]) == targets
    x = ex.load_source("chelsea", small_model)[None]
    for key in targets:  # the batched maps equal single-image explanations, class by class
        for row, c in enumerate((3, 5)):
            single = original(small_model, x, method="gradcam", target=key, classes=c).maps[0]
            torch.testing.assert_close(saved["maps"][key][row], single, atol=1e-5, rtol=1e-4)
    info = json.loads((out / "chelsea.json").read_text())
    assert [c["index"] for c in info["classes"]] == [3, 5]


def test_multiple_images_with_progress(tmp_path, capsys, small, photo_files):
    out = tmp_path / "many"
    code, stdout, stderr = run_cli(
        capsys, *small, *map(str, photo_files), "coffee", "--topk", "2", "--method", "linear_approx", "--out", str(out)
    )
    assert code == 0, stderr
    names = {p.name for p in out.iterdir()}
    assert names == {f"{n}.{s}" for n in ("photo", "photo_2", "coffee") for s in ("png", "pt", "json")}
    assert "3/3" in stderr and "explain" in stderr  # tqdm
    assert stdout.count("class name") == 3
    info = json.loads((out / "photo_2.json").read_text())
    assert info["image"] == str(photo_files[1]) and info["method"] == "linear_approx" and len(info["classes"]) == 2
    a, b = (torch.load(out / f, weights_only=True)["image"] for f in ("photo_2.pt", "coffee.pt"))
    torch.testing.assert_close(a, b, atol=2 / 255, rtol=0)  # the same photo, from a file and bundled


def test_existing_out_folder_keeps_other_files(tmp_path, capsys, small):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, stderr = run_cli(capsys, *small, "coffee", "--method", "gradient", "--target", "logit", "--out", str(out))
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == {"notes.txt", "coffee.png", "coffee.pt", "coffee.json"}
    saved = torch.load(out / "coffee.pt", weights_only=True)
    assert saved["layer"] is None and saved["attributions"]["logit"].shape == (3, 3, 32, 32)


def test_non_linear_method_gets_a_note(tmp_path, capsys, small):
    code, stdout, stderr = run_cli(
        capsys, *small, "--method", "guided_backprop", "--topk", "2", "--out", str(tmp_path / "o")
    )
    assert code == 0
    assert stderr.strip().splitlines() == [line for line in stderr.strip().splitlines() if line.startswith("note:")]
    assert "not linear" in stderr and "weighted" in stderr and "Warning" not in stderr
    info = json.loads((tmp_path / "o" / "chelsea.json").read_text())
    assert info["targets"]["weighted"]["linear"] is False and info["targets"]["logit"]["linear"] is False


def _corrupt(tmp_path: Path) -> str:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"this is not a JPEG")
    return str(path)


BAD_INPUTS = {
    "missing image": (lambda t, w: ["no_such_photo.png"], ["no_such_photo.png", "not found", "chelsea"]),
    "folder as image": (lambda t, w: [str(t)], ["folder", "chelsea"]),
    "corrupt image": (lambda t, w: [_corrupt(t)], ["broken.jpg", "cannot read"]),
    "unknown model": (lambda t, w: ["--model", "resnet9000"], ["resnet9000", "digits_cnn"]),
    "unknown method": (lambda t, w: ["--method", "gradcamm"], ["gradcamm", "gradcam"]),
    "unknown target": (lambda t, w: ["--target", "logit", "weigthed"], ["weigthed", "weighted"]),
    "unknown layer": (lambda t, w: ["--layer", "features.relu4"], ["features.relu4", "model.features.relu3"]),
    "layer on a method without one": (lambda t, w: ["--method", "gradient", "--layer", "x"], ["gradient", "xgradcam"]),
    "class out of range": (lambda t, w: ["--classes", "3", "10"], ["10", "0 to 9"]),
    "negative class": (lambda t, w: ["--classes", "-1"], ["-1", "0 to 9"]),
    "versus class out of range": (lambda t, w: ["--target", "versus:12"], ["12", "0 to 9"]),
    "topk zero": (lambda t, w: ["--topk", "0"], ["--topk", ">= 1"]),
    "weights of another architecture": (lambda t, w: ["--weights", str(w["digits_vit"])], ["digits_vit_random.pt"]),
    "missing weights file": (lambda t, w: ["--weights", str(t / "nope.pt")], ["nope.pt"]),
    "unknown device": (lambda t, w: ["--device", "gpu7"], ["gpu7", "cpu"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, small, weights, case):
    make_args, expected = BAD_INPUTS[case]
    out = tmp_path / "new" / "explain"
    args = make_args(tmp_path, weights)
    model = [] if "--model" in args else small[:2] if "--weights" in args else small
    code, stdout, stderr = run_cli(capsys, *model, *args, "--out", str(out))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backprop-hooks explain: error: "), stderr
    for word in expected:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "new").exists()
    assert stdout == ""


def test_unreadable_image_midway_is_skipped_and_the_others_are_written(tmp_path, capsys, small, photo_files):
    """One corrupt image among good ones: the good ones are written, the corrupt one gets one line, exit 2;
    a file already in --out that this command did not write is never replaced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.png").write_bytes(b"old figure")
    code, stdout, stderr = run_cli(
        capsys, *small, str(photo_files[0]), _corrupt(tmp_path), "chelsea", "--out", str(out)
    )
    assert code == 2
    lines = [line for line in stderr.splitlines() if "error" in line]
    assert any("broken.jpg" in line and "skipped" in line for line in lines), stderr
    assert "1 of 3 images" in lines[-1]
    assert (out / "photo.png").read_bytes() == b"old figure"
    assert {p.name for p in out.iterdir()} == {"photo.png"} | {
        f"{n}.{s}" for n in ("photo_2", "chelsea") for s in ("png", "pt", "json")
    }
    assert "photo_2" in stdout and not [p for p in out.iterdir() if p.name.endswith(".partial")]


def test_explain_classes_is_reusable(small_model):
    image = ex.load_source("astronaut", small_model)
    result = ex.explain_classes(small_model, image, method="xgradcam", targets=["weighted", "max"], topk=4)
    assert list(result.explanations) == ["weighted", "max"]
    assert result.maps("max").shape == (4, 32, 32) and result.ranks.tolist() == [1, 2, 3, 4]
    assert result.probabilities.shape == (4,) and result.layer == small_model.default_layer
    assert "astronaut" in ex.table(result, "astronaut")
    assert ex.target_title("versus:3", result.names) == "versus 3 (3)"
    assert ex.target_title("logit", result.names) == "logit (original)"


def test_plots_overlay_is_zero_centred():
    fig, ax = plt.subplots()
    heat = torch.tensor([[-0.5, 0.0], [1.0, 2.0]])
    artist = plots.overlay(ax, torch.rand(3, 2, 2), heat)
    assert artist.get_clim() == (-2.0, 2.0) and artist.get_alpha() == 0.5 and artist.get_cmap().name == "bwr"
    assert plots.symmetric_limit(torch.zeros(3)) == 1.0
    assert plots.image_hwc(torch.rand(3, 5, 7)).shape == (5, 7, 3)
    plt.close(fig)
    with pytest.raises(ValueError, match="one title per column"):
        plots.explanation_grid(torch.rand(3, 4, 4), [torch.rand(2, 4, 4)], ["a", "b"], ["r1", "r2"])


@pytest.mark.slow
def test_bundled_cat_photo_default_command(tmp_path, capsys):
    """The README's first command: EfficientNet-Lite0 on chelsea; the cat classes compete."""
    out = tmp_path / "explain"
    code, stdout, stderr = run_cli(capsys, "--out", str(out))
    assert code == 0, stderr
    info = json.loads((out / "chelsea.json").read_text())
    assert info["model"] == "efficientnet_lite0" and info["layer"] == "model.bn2"
    assert {c["index"] for c in info["classes"]} == {281, 282, 285}
    assert "tabby" in stdout and "Egyptian cat" in stdout
    saved = torch.load(out / "chelsea.pt", weights_only=True)
    assert saved["maps"]["weighted"].shape == (3, 224, 224)

    def off_diagonal(key):
        sim = np.array(info["targets"][key]["class_similarity"])
        return sim[~np.eye(3, dtype=bool)].mean()

    assert off_diagonal("logit") > 0.9  # the logit maps of the cat classes are near-identical
    assert off_diagonal("weighted") < off_diagonal("logit") - 0.5  # the contrast separates them
