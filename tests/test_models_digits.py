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


@pytest.mark.parametrize("name, minimum", [("digits_cnn", 0.98), ("digits_vit", 0.96)])
def test_shipped_weights_reach_their_accuracy(name, minimum):
    model = models.create(name)
    images, labels = datasets.digits("test", size=model.input_size[0])
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= minimum
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
