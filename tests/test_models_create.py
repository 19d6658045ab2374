"""`models.create`: the wrapper contract, attributes, local checkpoints and offline behaviour."""

from types import SimpleNamespace

import pytest
import torch

from backprop_hooks import models
from backprop_hooks.models import zoo
from backprop_hooks.models.digits_nets import DigitsCNN


def test_available_lists_the_contract_architectures():
    assert set(models.available()) == {
        "vgg16",
        "vgg16_bn",
        "alexnet",
        "resnet18",
        "resnet50",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "vit_b_16",
        "deit_tiny_patch16_224",
        "vit_tiny_patch16_224",
        "efficientnet_lite0",
        "digits_cnn",
        "digits_vit",
    }


def test_unknown_architecture_is_a_typed_error():
    with pytest.raises(models.UnknownArchitectureError, match="resnet18"):
        models.create("resnet17")


def test_normalized_equals_inner_model_on_normalised_input():
    torch.manual_seed(0)
    inner = torch.nn.Conv2d(3, 2, 1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    wrapped = models.Normalized(inner, mean, std)
    x = torch.rand(2, 3, 5, 5)
    expected = inner((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(wrapped(x), expected)
    assert list(wrapped.state_dict()) == ["model.weight", "model.bias"]


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 32, 32)])
def test_normalized_rejects_non_pixel_batches(shape):
    model = models.create("digits_cnn")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(shape))


def _check_attributes(model, name):
    assert model.arch == name and not model.training
    assert len(model.class_names) == model.model.get_submodule(zoo.head_name(model.model)).out_features
    assert model.default_layer.startswith("model.")
    model.get_submodule(model.default_layer)
    with torch.no_grad():
        logits = model(torch.rand(1, 3, *model.input_size))
    assert logits.shape == (1, len(model.class_names))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "digits_vit"])
def test_random_init_carries_the_attributes(name):
    _check_attributes(models.create(name, pretrained=False), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", models.available())
def test_every_architecture_carries_the_attributes(name):
    _check_attributes(models.create(name, pretrained=False), name)


def test_imagenet_class_names_are_offline():
    names = models.create("mobilenet_v3_small", pretrained=False).class_names
    assert len(names) == 1000 and names[281] == "tabby" and names[967] == "espresso"


def test_num_classes_replaces_the_head():
    model = models.create("digits_cnn", num_classes=4)
    assert model.class_names == ["0", "1", "2", "3"] and model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    shipped = models.create("digits_cnn").model.features.conv1.weight
    torch.testing.assert_close(model.model.features.conv1.weight, shipped)


def test_local_checkpoint_round_trip_reads_num_classes(tmp_path):
    source = models.create("digits_cnn", pretrained=False, num_classes=5)
    path = tmp_path / "five.pt"
    torch.save(source.model.state_dict(), path)
    loaded = models.create("digits_cnn", weights=path, class_names=list("abcde"))
    assert loaded.class_names == list("abcde")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    torch.save(source.state_dict(), path)  # the wrapper's keys ("model.") load as well
    assert len(models.create("digits_cnn", weights=path).class_names) == 5


def test_mismatched_checkpoint_names_missing_unexpected_and_shapes(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(models.create("digits_vit", pretrained=False).model.state_dict(), path)
    missing_and_unexpected = r"missing \d+: features\.conv1\.weight.*unexpected \d+: cls_token"
    with pytest.raises(models.WeightsMismatchError, match=missing_and_unexpected):
        models.create("digits_cnn", weights=path)
    torch.save(DigitsCNN(width=16).state_dict(), path)
    shape = r"shape mismatch \d+: features\.conv1\.weight \(16, 3, 3, 3\) vs \(32, 3, 3, 3\)"
    with pytest.raises(models.WeightsMismatchError, match=shape):
        models.create("digits_cnn", weights=path)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        models.create("digits_cnn", weights=tmp_path / "nothing.pt")


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_offline_pretrained_fails_fast_with_a_typed_error(monkeypatch, name):
    monkeypatch.setattr(zoo, "torch_hub_cached", lambda url: False)
    monkeypatch.setattr(zoo, "hf_hub_cached_file", lambda repo: None)
    monkeypatch.setattr("backprop_hooks.models.weights.unreachable_reason", lambda url, timeout=3.0: "offline (test)")
    with pytest.raises(models.WeightsUnavailableError) as info:  # before any download is attempted
        models.create(name, pretrained=True)
    message = str(info.value)
    assert "\n" not in message and "offline (test)" in message
    assert "weights=PATH" in message and "--weights PATH" in message


def test_probe_of_an_unresolvable_host_gives_a_reason():
    from backprop_hooks.models.weights import unreachable_reason

    assert unreachable_reason("https://no-such-host.invalid/weights.pth", timeout=2.0) is not None


def test_probe_cuts_off_a_hanging_connection(monkeypatch):
    """A lookup that never answers is cut off by the timeout (structurally: the probe thread is abandoned)."""
    import threading

    from backprop_hooks.models import weights

    release = threading.Event()
    monkeypatch.setattr(weights.urllib.request, "getproxies", lambda: {})
    monkeypatch.setattr(
        weights.socket, "create_connection", lambda *a, **k: release.wait() and SimpleNamespace(close=lambda: None)
    )
    try:
        assert (
            weights.unreachable_reason("https://example.invalid/w.pth", timeout=0.2)
            == "no answer from example.invalid:443 within 0.2 s"
        )
    finally:
        release.set()
