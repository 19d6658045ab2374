"""What a text model can read, checked before anything runs: token ids inside its vocabulary, sequences no longer
than its positions.

The vocabulary is the input embedding's ``num_embeddings``. The positions are those of a learned (or fixed)
absolute position embedding (``position_embeddings``, ``wpe``, ``embed_positions``, ``position_embedding``):
its size less the offset of a padding index (RoBERTa's positions start after ``padding_idx``), and at most the
config's ``n_positions`` / ``max_position_embeddings`` (OPT and BART store two offset rows). A model without such
a module (rotary or relative positions, ALiBi) has no hard limit and is never refused.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import InputError

POSITION_EMBEDDINGS = ("position_embeddings", "position_embedding", "wpe", "embed_positions")
POSITION_CONFIG = ("n_positions", "max_position_embeddings")


def check_vocabulary(input_ids: torch.Tensor, embedding: nn.Module) -> None:
    """:class:`~backprop_hooks.errors.InputError` naming the first token id outside ``0..num_embeddings-1`` and its
    position (one host synchronisation; nothing when the embedding does not say its size)."""
    size = getattr(embedding, "num_embeddings", None)
    if not isinstance(size, int):
        return
    outside = (input_ids < 0) | (input_ids >= size)
    if bool(outside.any()):
        row, column = (int(i) for i in outside.nonzero()[0])
        raise _outside(int(input_ids[row, column]), row, column, "input_ids", size)


def check_rows_vocabulary(rows: Sequence[Sequence[int]], embedding: nn.Module, what: str) -> None:
    """:func:`check_vocabulary` for rows of token ids of any lengths (``what`` names them in the message)."""
    size = getattr(embedding, "num_embeddings", None)
    if not isinstance(size, int) or not rows:
        return
    flat = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    outside = ((flat < 0) | (flat >= size)).nonzero()
    if len(outside):
        first = int(outside[0])
        ends = torch.tensor([len(r) for r in rows]).cumsum(0)
        row = int((ends <= first).sum())
        raise _outside(int(flat[first]), row, first - (int(ends[row - 1]) if row else 0), what, size)


def _outside(token: int, row: int, column: int, what: str, size: int) -> InputError:
    return InputError(
        f"token id {token} at position ({row}, {column}) of {what} is outside the vocabulary of {size} tokens "
        f"(ids 0..{size - 1}); encode the text with the model's own tokenizer"
    )


def position_limit(model: nn.Module) -> Optional[int]:
    """How many tokens ``model`` can position: see the module docstring; ``None`` when it has no hard limit."""
    table = next(
        (m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in POSITION_EMBEDDINGS),
        None,
    )
    if not isinstance(table, nn.Embedding):
        return None
    offset = 0 if table.padding_idx is None else table.padding_idx + 1
    limits = [table.num_embeddings - offset]
    config = getattr(model, "config", None)
    limits += [v for v in (getattr(config, key, None) for key in POSITION_CONFIG) if isinstance(v, int) and v > 0]
    return min(limits)


def check_length(input_ids: torch.Tensor, model: nn.Module) -> None:
    """:class:`~backprop_hooks.errors.InputError` when the sequences are longer than the model's positions."""
    check_token_count(input_ids.shape[1], model)


def check_token_count(length: int, model: nn.Module) -> None:
    """:func:`check_length` for sequences of ``length`` tokens."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise InputError(
            f"input_ids has {length} tokens, the model has {limit} positions; truncate the sequences to at most "
            f"{limit} tokens (e.g. the tokenizer's truncation=True, max_length={limit})"
        )
