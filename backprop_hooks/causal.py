r"""A causal language model's read-out: which position's logits predict which token, and the positions a padded
row needs to be seen as it is alone.

A causal LM's output ``.logits`` is (B, L, V): the logits at position ``i`` predict token ``i + 1``. In a padded
batch the next token of row ``b`` is read at its own last real token, ``last_real(mask)[b]``, not at column
``-1`` (a right-padded row's column ``-1`` is padding, and its logits there predict nothing the user asked
about). A left-padded row is seen as it is alone only with its own absolute positions,
``position_ids(mask)``: 0 at its first real token (models with absolute position embeddings, such as GPT-2,
count from column 0 otherwise; rotary models are unaffected by the shift, and get the same ids).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .errors import ModelOutputError, NonFiniteLogitsError, OptionError


def is_causal(model: nn.Module) -> bool:
    """True when one of ``model``'s modules declares ``is_causal = True`` (Hugging Face decoder attention) or is a
    class Hugging Face registers as a causal language model (Bloom's attention declares nothing)."""
    modules = list(model.modules())
    if any(getattr(m, "is_causal", False) is True for m in modules):
        return True
    return any(type(m).__name__ in _hf_causal_lm_classes() for m in modules)


@functools.lru_cache(maxsize=1)
def _hf_causal_lm_classes() -> frozenset:
    """The class names of Hugging Face's causal language models (empty when transformers was never imported: a
    model of it would have imported it)."""
    if "transformers" not in sys.modules:
        return frozenset()
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return frozenset()
    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


@contextlib.contextmanager
def nan_from_padding(
    mask: torch.Tensor, fix: str = "try the other padding side, or these rows alone"
) -> Iterator[None]:
    """Non-finite logits of a padded batch get a clause: some models' own forward computes NaN for padded rows
    (Bloom, for one, under left padding), and ``fix`` says what to try."""
    try:
        yield
    except NonFiniteLogitsError as exc:
        if bool(mask.bool().all()):
            raise
        side = "on the left" if left_padded(mask) else "on the right"
        raise NonFiniteLogitsError(
            f"{exc}; the batch is padded {side}, and some models compute NaN for padded rows themselves (Bloom, for "
            f"one, under left padding): {fix}"
        ) from exc


def last_real(mask: torch.Tensor) -> torch.Tensor:
    """(B,) the column of each row's last real token (``mask == 1``), whatever the padding side."""
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (columns * (mask != 0)).amax(dim=1)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) absolute positions counted from each row's first real token (padding: 0)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def left_padded(mask: torch.Tensor) -> bool:
    """True when some row has padding before a real token (a 0 followed by a 1)."""
    return bool((mask[:, 1:] > mask[:, :-1]).any())


def takes(model: nn.Module, name: str) -> bool:
    """True when ``model.forward`` has a parameter called ``name``."""
    forward = model.forward
    forward = getattr(forward, "__func__", forward)
    try:
        return name in _parameters(forward)
    except TypeError:  # an unhashable callable
        return name in _parameters.__wrapped__(forward)


@functools.lru_cache(maxsize=256)
def _parameters(forward: Callable) -> frozenset:
    """The parameter names of a forward function (read once per function: ``inspect.signature`` is slow)."""
    try:
        return frozenset(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def sequence_logits(output: Any) -> torch.Tensor:
    """The (B, L, V) per-position logits of a language model's output (its ``.logits``, or the tensor itself)."""
    found = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if isinstance(found, torch.Tensor) and found.dim() == 3:
        return found
    shape = tuple(found.shape) if isinstance(found, torch.Tensor) else type(output).__name__
    raise ModelOutputError(
        f"a causal language model's output must hold (B, L, V) logits (a tensor or .logits), got {shape}; "
        "pass logits=fn (output -> (B, V) logits) to select them"
    )


class NextToken:
    """The read-out ``output -> (B, V)``: each row's logits at ``positions`` (B,), by default its last real
    token, i.e. the distribution of the token that follows the row. A stacked batch of ``k·B`` rows (the points
    of SmoothGrad or Integrated Gradients) reads the same positions in each of the ``k`` copies."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions

    def __call__(self, output: Any) -> torch.Tensor:
        logits = sequence_logits(output)
        k = logits.shape[0] // self.positions.shape[0]
        positions = self.positions.repeat(k) if k > 1 else self.positions
        return logits[torch.arange(logits.shape[0], device=logits.device), positions.to(logits.device)]


def landing_on_padding(selected: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> Optional[tuple]:
    """``(row, column)`` of the first row whose selected (V,) logits are exactly the logits of one of its
    padding positions, or None. ``selected`` (B, V), ``logits`` (B, L, V), ``mask`` (B, L)."""
    if selected.dim() != 2 or logits.dim() != 3 or selected.shape[0] != logits.shape[0]:
        return None
    if selected.shape[1] != logits.shape[2] or logits.shape[:2] != mask.shape:
        return None
    same = (logits == selected.detach()[:, None, :]).all(dim=2) & (mask == 0)
    if not bool(same.any()):
        return None
    row, column = same.nonzero()[0].tolist()
    return row, column


class CheckedReadout:
    """A user's ``logits=`` function on a padded batch of a causal LM, refused where it reads a padding position
    (``out.logits[:, -1]`` on a right-padded batch): checked on the first call of an explanation."""

    def __init__(self, fn: Callable[[Any], torch.Tensor], mask: torch.Tensor):
        self.fn, self.mask, self.checked = fn, mask, False

    def __call__(self, output: Any) -> torch.Tensor:
        selected = self.fn(output)
        if not self.checked and isinstance(selected, torch.Tensor):
            self.checked = True
            logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
            if isinstance(logits, torch.Tensor) and logits.shape[0] == self.mask.shape[0]:
                found = landing_on_padding(selected, logits, self.mask)
                if found is not None:
                    row, column = found
                    last = int(last_real(self.mask[row : row + 1])[0])
                    raise OptionError(
                        f"the logits= function reads row {row} at position {column}, which is padding (its last "
                        f"real token is at {last}): leave logits= out to explain each row's next token after its "
                        "last real token, or pad on the left"
                    )
        return selected
