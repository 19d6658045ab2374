"""The architectures `models.create` knows: how to build each one, load its default weights, and preprocess."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from . import digits_data
from . import digits_nets, efficientnet_lite
from backprop_hooks.errors import UnknownArchitectureError, WeightsMismatchError, WeightsUnavailableError
from .normalized import Normalized
from .weights import download, hf_hub_cached_file, load_into, read_state_dict, torch_hub_cached

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def _torchvision_lib():
    """torchvision, imported on first use (it takes seconds: ``--help`` and the model list do without it)."""
    import torchvision

    return torchvision


def _timm_lib():
    """timm, imported on first use."""
    import timm

    return timm


@dataclass(frozen=True)
class Preprocessing:
    """How pixels reach the network: normalisation, input size, and the resize-and-crop of photos."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int]
    crop_pct: float
    interpolation: str


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: builders for random and default weights, its preprocessing, classes and best layer."""

    name: str
    build: Callable[[int], nn.Module]  # num_classes -> randomly initialised network
    build_pretrained: Callable[[], nn.Module]  # network with the default weights (WeightsUnavailableError)
    preprocessing: Callable[[], Preprocessing]
    class_names: Callable[[], list[str]]
    default_layer: str  # qualified name inside the network (the wrapper adds "model.")
    num_classes: int = 1000
    finetune_from_scratch: bool = False  # `models.finetune` trains it from random init, not from its weights


@lru_cache(maxsize=None)
def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in index order, as torchvision ships them (no download)."""
    return list(_torchvision_lib().models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _torchvision(name: str, default_layer: str) -> ArchSpec:
    def default_weights():
        return _torchvision_lib().models.get_model_weights(name).DEFAULT

    def build_pretrained() -> nn.Module:
        weights = default_weights()
        return download(
            f"torchvision {weights}",
            weights.url,
            torch_hub_cached(weights.url),
            lambda: _torchvision_lib().models.get_model(name, weights=weights),
        )

    def preprocessing() -> Preprocessing:
        t = default_weights().transforms()
        crop, resize = t.crop_size[0], t.resize_size[0]
        return Preprocessing(tuple(t.mean), tuple(t.std), (crop, crop), crop / resize, t.interpolation.value)

    return ArchSpec(
        name,
        lambda n: _torchvision_lib().models.get_model(name, weights=None, num_classes=n),
        build_pretrained,
        preprocessing,
        imagenet_classes,
        default_layer,
    )


def _timm(name: str, default_layer: str) -> ArchSpec:
    def build_pretrained() -> nn.Module:
        cfg = _timm_lib().models.get_pretrained_cfg(name)
        url = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
        cached = hf_hub_cached_file(cfg.hf_hub_id) if cfg.hf_hub_id else None
        overlay = {"pretrained_cfg_overlay": {"file": cached}} if cached else {}
        return download(
            f"timm {name} weights",
            url,
            cached is not None,
            lambda: _timm_lib().create_model(name, pretrained=True, **overlay),
        )

    def preprocessing() -> Preprocessing:
        cfg = _timm_lib().models.get_pretrained_cfg(name)
        return Preprocessing(
            tuple(cfg.mean), tuple(cfg.std), tuple(cfg.input_size[1:]), cfg.crop_pct, cfg.interpolation
        )

    return ArchSpec(
        name,
        lambda n: _timm_lib().create_model(name, pretrained=False, num_classes=n),
        build_pretrained,
        preprocessing,
        imagenet_classes,
        default_layer,
    )


def _efficientnet_lite0() -> ArchSpec:
    def preprocessing() -> Preprocessing:
        cfg = _timm_lib().models.get_pretrained_cfg(efficientnet_lite.TIMM_NAME)
        return Preprocessing(
            tuple(cfg.mean), tuple(cfg.std), tuple(cfg.input_size[1:]), cfg.crop_pct, cfg.interpolation
        )

    return ArchSpec(
        "efficientnet_lite0",
        efficientnet_lite.build,
        efficientnet_lite.build_pretrained,
        preprocessing,
        imagenet_classes,
        "bn2",
    )


def _digits(name: str, build: Callable[[int], nn.Module], default_layer: str) -> ArchSpec:
    path = WEIGHTS_DIR / f"{name}.pt"

    def build_pretrained() -> nn.Module:
        if not path.is_file():
            raise WeightsUnavailableError(
                f"shipped weights {path} are missing (reproduce them with: "
                f"python -m backprop_hooks.models.train_digits "
                f"--arch {name}); or pass weights=PATH (--weights PATH) to load a local checkpoint"
            )
        return load_into(build(10), read_state_dict(path), str(path))

    size = digits_nets.INPUT_SIZE
    prep = Preprocessing((0.5,) * 3, (0.5,) * 3, (size, size), 1.0, "bilinear")
    return ArchSpec(
        name,
        build,
        build_pretrained,
        lambda: prep,
        lambda: list(digits_data.CLASS_NAMES),
        default_layer,
        num_classes=10,
        finetune_from_scratch=True,
    )


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in [
        _torchvision("vgg16", "features.29"),  # ReLU after the last conv (14x14)
        _torchvision("vgg16_bn", "features.42"),
        _torchvision("alexnet", "features.11"),
        _torchvision("resnet18", "layer4"),
        _torchvision("resnet50", "layer4"),
        _torchvision("mobilenet_v3_small", "features"),
        _torchvision("mobilenet_v3_large", "features"),
        _torchvision("efficientnet_b0", "features"),
        # ViTs: the input of the last block's attention, where patch tokens still reach the class token.
        _torchvision("vit_b_16", "encoder.layers.encoder_layer_11.ln_1"),
        _timm("deit_tiny_patch16_224", "blocks.11.norm1"),
        _timm("vit_tiny_patch16_224", "blocks.11.norm1"),
        _efficientnet_lite0(),
        _digits("digits_cnn", digits_nets.digits_cnn, "features.relu3"),
        _digits("digits_vit", digits_nets.digits_vit, "blocks.3.norm1"),
    ]
}


def available() -> list[str]:
    """Names accepted by `create`."""
    return list(ARCHITECTURES)


def spec(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownArchitectureError(f"unknown architecture {name!r}; available: {', '.join(available())}") from None


def head_name(network: nn.Module) -> str:
    """Qualified name of the classifier: the last `nn.Linear` registered in the network."""
    names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(network).__name__} has no nn.Linear classifier")
    return names[-1]


def replace_head(network: nn.Module, num_classes: int) -> nn.Module:
    """Give the network a fresh, randomly initialised classifier for `num_classes` classes."""
    if hasattr(network, "reset_classifier"):  # timm models
        network.reset_classifier(num_classes)
        return network
    name = head_name(network)
    old = network.get_submodule(name)
    network.set_submodule(name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return network


def read_checkpoint(path: str | os.PathLike) -> dict:
    """`read_state_dict(path)`, with every way a file can fail to be a checkpoint (text, empty, truncated, a
    whole pickled model, another format) turned into a WeightsMismatchError that says what was found."""
    import pickle

    path = Path(path)
    if path.is_dir():
        raise WeightsMismatchError(f"--weights {str(path)!r} is a folder; give the checkpoint file (e.g. best.pt)")
    if path.is_file() and path.stat().st_size == 0:
        raise WeightsMismatchError(f"checkpoint {path} is empty (0 bytes)")
    try:
        return read_state_dict(path)
    except (WeightsMismatchError, FileNotFoundError):
        raise
    except pickle.UnpicklingError as error:
        text = str(error).splitlines()[0] if str(error) else ""
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise WeightsMismatchError(
                f"{path} holds a whole pickled model, not a state dict; only state dicts load safely: re-save it "
                "with torch.save(model.state_dict(), PATH)"
            ) from None
        raise WeightsMismatchError(f"{path} is not a PyTorch checkpoint ({text or 'unreadable pickle'})") from None
    except Exception as error:  # EOFError, BadZipFile, RuntimeError, IndexError, ...: not a readable file
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsMismatchError(
            f"{path} is not a readable PyTorch checkpoint (truncated, or another format): {text}"
        ) from None


def class_names_beside(path: str | os.PathLike, num_classes: int) -> list[str] | None:
    """The class names in `class_names.json` next to a checkpoint (as `models.finetune` writes it), when that
    file holds a list of `num_classes` strings; else None."""
    import json

    names_file = Path(path).resolve().parent / "class_names.json"
    try:
        names = json.loads(names_file.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return names
    return None


def network_from_checkpoint(arch: ArchSpec, path: str | os.PathLike, num_classes: int | None) -> nn.Module:
    """The network with the local checkpoint `path` loaded (strict); None classes: as many as the checkpoint's head."""
    state = read_checkpoint(path)
    network = arch.build(num_classes or arch.num_classes)
    if num_classes is None:  # take the number of classes from the checkpoint's classifier
        head_weight = state.get(f"{head_name(network)}.weight")
        if head_weight is not None and head_weight.dim() == 2 and head_weight.shape[0] != arch.num_classes:
            network = arch.build(head_weight.shape[0])
    return load_into(network, state, str(path))


def create(
    name: str,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    *,
    class_names: Sequence[str] | None = None,
) -> Normalized:
    """Build architecture `name` as a `Normalized` model in eval mode that takes pixel-space input in [0, 1].

    Weights: `weights=PATH` loads a local state dict (`pretrained` is then ignored; the number of classes
    is read from the checkpoint unless given; a `class_names.json` next to it names the classes); else
    `pretrained=True` loads the architecture's default
    weights (torchvision/timm download, the bundled EfficientNet-Lite0, the shipped digits networks) and,
    if `num_classes` differs from the default, replaces the classifier by a fresh one; else random init.

    The result carries `class_names`, `input_size` (H, W), `default_layer` (a module name on the result,
    e.g. "model.layer4"), `arch`, and the photo preprocessing `crop_pct` and `interpolation`.
    Raises UnknownArchitectureError, WeightsUnavailableError, WeightsMismatchError, FileNotFoundError.
    """
    arch = spec(name)
    if weights is not None:
        network = network_from_checkpoint(arch, weights, num_classes)
        if class_names is None:
            class_names = class_names_beside(weights, num_outputs(network))
    elif pretrained:
        network = arch.build_pretrained()
        if num_classes is not None and num_classes != arch.num_classes:
            network = replace_head(network, num_classes)
    else:
        network = arch.build(num_classes or arch.num_classes)
    return wrap(network, arch, class_names)


def num_outputs(network: nn.Module) -> int:
    """The number of classes: the output size of the classifier."""
    return network.get_submodule(head_name(network)).out_features


def wrap(network: nn.Module, arch: ArchSpec, class_names: Sequence[str] | None = None) -> Normalized:
    """`Normalized(network)` with the architecture's preprocessing and attributes, in eval mode."""
    n = num_outputs(network)
    if class_names is not None and len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names given for a {n}-class model")
    prep = arch.preprocessing()
    model = Normalized(network, prep.mean, prep.std)
    model.class_names = (
        list(class_names)
        if class_names is not None
        else (arch.class_names() if n == arch.num_classes else [str(i) for i in range(n)])
    )
    model.input_size = prep.input_size
    model.default_layer = f"model.{arch.default_layer}"
    model.arch = arch.name
    model.crop_pct = prep.crop_pct
    model.interpolation = prep.interpolation
    return model.eval()
