"""Obtaining weights: pretrained downloads that fail fast when offline, and local checkpoints.

Downloads go through torchvision's and timm's own code. Before a download starts, the checkpoint cache is
checked and, on a cache miss, the download host (or the HTTPS proxy) is probed with a short timeout, so an
offline machine gets a `WeightsUnavailableError` within seconds instead of minutes of retries.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import torch
from torch import nn

from backprop_hooks.errors import WeightsMismatchError, WeightsUnavailableError

PROBE_TIMEOUT_S = 3.0
LOCAL_HINT = "pass weights=PATH (command line: --weights PATH) to load a local checkpoint"

T = TypeVar("T")


def unreachable_reason(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a TCP connection to the host of `url` (or to its proxy) opens within `timeout` s, else why not.

    The probe runs in a daemon thread, so a hanging DNS lookup is cut off by the same timeout.
    """
    proxy = urllib.request.getproxies().get(urllib.parse.urlparse(url).scheme)
    target = urllib.parse.urlparse(proxy or url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    if host is None:
        return f"no host in {proxy or url!r}"
    answer: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(None)
        except OSError as error:
            answer.append(f"cannot reach {host}:{port} ({error})")

    thread = threading.Thread(target=probe, name="weights-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else f"no answer from {host}:{port} within {timeout:g} s"


def download(what: str, url: str, cached: bool, fetch: Callable[[], T]) -> T:
    """Run `fetch()` (a library's own download-and-load code) and turn every failure into WeightsUnavailableError.

    `cached` says whether the checkpoint is already in the library's cache; if it is not, the host is probed
    first so that an offline machine fails fast.
    """
    if not cached:
        reason = unreachable_reason(url)
        if reason is not None:
            raise WeightsUnavailableError(f"could not download {what} from {url}: {reason}; {LOCAL_HINT}")
    try:
        return fetch()
    except (OSError, RuntimeError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsUnavailableError(f"could not load {what} from {url}: {message}; {LOCAL_HINT}") from error


def torch_hub_cached(url: str) -> bool:
    """Whether torch.hub's checkpoint cache already holds the file that `url` names."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def hf_hub_cached_file(repo_id: str) -> str | None:
    """Path of a cached timm checkpoint of the Hugging Face repo `repo_id`, or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str):
            return path
    return None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a local checkpoint as a state dict (`torch.load(..., weights_only=True)`).

    Accepts a plain state dict, a wrapper's state dict (keys prefixed `model.`), or a training checkpoint
    (a dict whose `"model"` entry is the state dict, as `models.finetune` writes in `last.pt`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsMismatchError(f"{path} does not hold a state dict (a mapping from names to tensors)")
    if checkpoint and all(k.startswith("model.") for k in checkpoint):
        checkpoint = {k[len("model.") :]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def _brief(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise WeightsMismatchError naming missing, unexpected and shape-mismatched keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{label} {len(items)}: {_brief(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        if items
    ]
    if problems:
        raise WeightsMismatchError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Check that `state_dict` fits `model` exactly, then load it (strict)."""
    check_fits(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    return model


def map_in_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Rename the tensors of `source` to the keys of `target`, pairing them by position.

    For two implementations of one architecture whose state dicts list the same tensors in the same order
    under different names. Raises WeightsMismatchError unless the counts and every pair of shapes agree.
    """
    if len(source) != len(target):
        raise WeightsMismatchError(f"{what}: {len(source)} source tensors vs {len(target)} target tensors")
    mapped: dict[str, torch.Tensor] = {}
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items()):
        if tensor.shape != reference.shape:
            raise WeightsMismatchError(
                f"{what}: {source_key} {tuple(tensor.shape)} cannot map to {target_key} {tuple(reference.shape)}"
            )
        mapped[target_key] = tensor
    return mapped
