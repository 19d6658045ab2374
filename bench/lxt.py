"""LXT (``pip install lxt``, the library of AttnLRP by Achtibat et al.) as a peer of ``attnlrp``, undone after use.

LXT's efficient AttnLRP monkey-patches classes and modules for good: ``forward`` of ``torch.nn.LayerNorm``,
``torch.nn.Dropout``, Hugging Face's MLP and RMSNorm classes, the attention functions of a modeling module.
:func:`patched` applies one of LXT's own patch maps and, on exit (also after an exception), restores every
attribute it added or changed, so no later model in the process is silently patched.

Two shims make LXT 2.1 run on transformers 5 (both undone on exit too): importing LXT's patch maps imports
its copy of transformers 4's BERT, which needs ``transformers.pytorch_utils.find_pruneable_heads_and_indices``
and ``prune_linear_layer`` (set to ``None`` while patched; that BERT copy itself does not run on transformers
5); LXT replaces a modeling module's ``ALL_ATTENTION_FUNCTIONS`` with a plain dict, which transformers 5 calls
as ``ALL_ATTENTION_FUNCTIONS.get_interface(name, default)``: the dict is given that one method.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

# family -> (the module LXT patches, LXT's map module, the map LXT uses by default for it)
FAMILIES: Dict[str, Tuple[str, str, str]] = {
    "gpt2": ("transformers.models.gpt2.modeling_gpt2", "lxt.efficient.models.gpt2", "attnLRP"),
    "llama": ("transformers.models.llama.modeling_llama", "lxt.efficient.models.llama", "attnLRP"),
    "gemma3": ("transformers.models.gemma3.modeling_gemma3", "lxt.efficient.models.gemma3", "attnLRP"),
    "vit_torch": ("torchvision.models.vision_transformer", "lxt.efficient.models.vit_torch", "cp_LRP"),
}
_MISSING_IN_TRANSFORMERS_5 = ("find_pruneable_heads_and_indices", "prune_linear_layer")


def installed() -> bool:
    return importlib.util.find_spec("lxt") is not None


def version() -> Optional[str]:
    if not installed():
        return None
    from importlib.metadata import version as _version

    return _version("lxt")


def family_of(model: torch.nn.Module) -> Optional[str]:
    """The LXT family of a model (by the module of its classes), or None where LXT has no patch map."""
    modules = {type(m).__module__ for m in model.modules()}
    for family, (target, _, _) in FAMILIES.items():
        if target in modules:
            return family
    return None


class _Snapshot:
    """The own attributes of classes and modules, to put back exactly as they were."""

    def __init__(self, objects: List[Any]) -> None:
        self.saved = [(obj, dict(vars(obj))) for obj in objects]

    def restore(self) -> None:
        for obj, before in self.saved:
            for name in [n for n in vars(obj) if n not in before]:
                delattr(obj, name)
            for name, value in before.items():
                if vars(obj).get(name, _Snapshot) is not value:
                    setattr(obj, name, value)


class _AttentionFunctions(dict):
    """LXT's dict of patched attention functions, callable the way transformers 5 calls it."""

    def get_interface(self, attn_implementation: str, default: Callable) -> Callable:
        return self.get(attn_implementation, default)


@contextlib.contextmanager
def patched(family: str, variant: Optional[str] = None) -> Iterator[None]:
    """Models of ``family`` (``"gpt2"``, ``"llama"``, ``"vit_torch"``) run LXT's AttnLRP (its default map, or
    ``variant``: ``"attnLRP"``/``"cp_LRP"``) inside the block; everything LXT changed is restored on exit."""
    target_name, map_name, default = FAMILIES[family]
    utils = importlib.import_module("transformers.pytorch_utils")
    shims = [n for n in _MISSING_IN_TRANSFORMERS_5 if not hasattr(utils, n)]
    snapshots: List[_Snapshot] = []
    try:
        for name in shims:
            setattr(utils, name, None)
        from lxt.efficient import monkey_patch

        patch_map = getattr(importlib.import_module(map_name), variant or default)
        target = importlib.import_module(target_name)
        snapshots.append(_Snapshot(list(patch_map) + [target]))
        monkey_patch(target, patch_map)
        functions = getattr(target, "ALL_ATTENTION_FUNCTIONS", None)
        if isinstance(functions, dict) and not hasattr(functions, "get_interface"):
            target.ALL_ATTENTION_FUNCTIONS = _AttentionFunctions(functions)
        yield
    finally:
        for snapshot in reversed(snapshots):
            snapshot.restore()
        for name in shims:
            if hasattr(utils, name):
                delattr(utils, name)


def relevance(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """LXT's read-out: ``x ⊙ ∂(seed · forward(x))/∂x`` under its patches (call inside :func:`patched`)."""
    xg = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(forward(xg), xg, seed)
    return xg.detach() * g
