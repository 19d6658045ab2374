"""The digits data and the shipped digits networks."""

import pytest
import torch

from backprop_hooks import models
from backprop_hooks.eval import datasets
from backprop_hooks.models.digits_data import _split_indices


def test_split_is_fixed_stratified_and_disjoint():
    train_x, train_y = datasets.digits("train")
    test_x, test_y = datasets.digits("test")
    assert train_x.shape == (1347, 3, 32, 32) and test_x.shape == (450, 3, 32, 32)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert 0 <= train_x.min() and train_x.max() <= 1
    assert torch.equal(train_x[:, 0], train_x[:, 2])
    assert set(test_y.bincount().tolist()) <= {43, 44, 45, 46}
    assert torch.equal(datasets.digits("test")[0], test_x)
    train, test = _split_indices()["train"], _split_indices()["test"]
    assert len(set(train) | set(test)) == 1797 and not set(train) & set(test)


def test_size_and_split_arguments():
    assert datasets.digits("test", size=16)[0].shape == (450, 3, 16, 16)
    with pytest.raises(ValueError, match="split"):
        datasets.digits("val")


@pytest.mark.parametrize("name, minimum, correct", [("digits_cnn", 0.98, 444), ("digits_vit", 0.96, 443)])
def test_shipped_weights_reach_their_accuracy(name, minimum, correct):
    """The accuracies stated for the shipped weights (models/weights/README.md: 444 and 443 of 450)."""
    model = models.create(name)
    images, labels = datasets.digits("test", size=model.input_size[0])
    with torch.no_grad():
        hits = int((model(images).argmax(1) == labels).sum())
    assert hits / 450 >= minimum and hits == correct
    assert model.class_names == [str(d) for d in range(10)]


@pytest.mark.slow
def test_cnn_recipe_reaches_the_accuracy_again(tmp_path):
    from backprop_hooks.models.train_digits import train

    threads = torch.get_num_threads()
    try:
        result = train("digits_cnn", tmp_path / "run", weights_path=tmp_path / "digits_cnn.pt", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.final_acc >= 0.98
    assert models.create("digits_cnn", weights=tmp_path / "digits_cnn.pt").class_names[3] == "3"


def test_train_digits_command_line_writes_each_recipe_to_its_file(tmp_path, monkeypatch, capsys):
    """`python -m backprop_hooks.models.train_digits`: each architecture trained with its own recipe into
    --out/<arch>, the final weights written to --weights-dir/<arch>.pt ("all": both), the accuracy printed."""
    from backprop_hooks.models import train_digits
    from backprop_hooks.models.finetune import FinetuneResult

    calls = []

    def fake_train(arch, out_dir, weights_path=None, progress=True, **overrides):
        calls.append((arch, out_dir, weights_path))
        return FinetuneResult(None, 0.5, 0.25 if arch == "digits_cnn" else 0.75, out_dir, [{}] * 3)

    monkeypatch.setattr(train_digits, "train", fake_train)
    out, weights = tmp_path / "runs", tmp_path / "w"
    assert train_digits.main(["--arch", "all", "--out", str(out), "--weights-dir", str(weights)]) == 0
    assert calls == [
        ("digits_cnn", out / "digits_cnn", weights / "digits_cnn.pt"),
        ("digits_vit", out / "digits_vit", weights / "digits_vit.pt"),
    ]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("digits_cnn: test accuracy 0.2500 after 3 epochs")
    assert printed[1].startswith("digits_vit: test accuracy 0.7500 after 3 epochs")
    calls.clear()
    assert train_digits.main(["--arch", "digits_vit", "--out", str(out), "--weights-dir", str(weights)]) == 0
    assert [c[0] for c in calls] == ["digits_vit"]
    assert train_digits.RECIPES["digits_cnn"]["epochs"] == 20 and train_digits.RECIPES["digits_vit"]["epochs"] == 60


@pytest.mark.slow
def test_train_saves_the_final_weights_and_reports_their_accuracy(tmp_path):
    """Two epochs of the CNN recipe: the file holds the final model's weights (not the best epoch's), and
    the reported final accuracy is that of the file's weights on the test split."""
    from backprop_hooks.models.train_digits import train

    threads = torch.get_num_threads()
    try:
        result = train("digits_cnn", tmp_path / "run", weights_path=tmp_path / "w.pt", progress=False, epochs=2)
    finally:
        torch.set_num_threads(threads)
    assert len(result.history) == 2
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    final = result.model.model.state_dict()
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)
    model = models.create("digits_cnn", weights=tmp_path / "w.pt")
    images, labels = datasets.digits("test", size=32)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).double().mean().item()
    assert accuracy == pytest.approx(result.final_acc, abs=1e-9)
    assert result.history[-1]["val_acc"] == pytest.approx(result.final_acc, abs=1e-9)
