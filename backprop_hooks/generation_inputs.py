r"""What ``bh.explain_generation`` is given, as one layout: prompts, answers and foil answers as token rows,
from tensors or from strings with a Hugging Face tokenizer, and the teacher-forced batch built from them.

The layout of ``R`` sequences (the ``B`` answers, then the ``B`` foils if there are any): every prompt
right-aligned so that it ends at column ``P - 1`` (left padding), its continuation from column ``P`` on
(right padding after a shorter one), ``T = P + c`` columns for the longest continuation ``c``. A left-padded
row gets the positions it has alone (``position_ids``, counted from its first real token), so a padded batch
gives each prompt what it gets alone. The logits at column ``P + j - 1`` predict continuation token ``j``.

Strings: the prompt and its answer are tokenised together, as the model reads them (not the answer alone,
which would get its own BOS and lose the word boundary); the answer's tokens are those the joint text has
after the prompt's. Special tokens and BOS are what the tokenizer adds; a leading space is kept (``" Paris"``
and ``"Paris"`` are different tokens). ``chat=True`` puts each prompt into the tokenizer's chat template as
a user turn with the generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

from .causal import position_ids
from .errors import InputError, OptionError
from .module_weights import input_device

Rows = List[List[int]]


@dataclass
class Layout:
    """The teacher-forced batch: ``ids``/``mask`` (R, T), prompts in columns [0, P), continuations in [P, T);
    ``steps``/``step_mask`` (R, c): each row's continuation tokens and which are real; ``rows`` answers (and
    then as many foils)."""

    ids: torch.Tensor
    mask: torch.Tensor
    prompt: int
    steps: torch.Tensor
    step_mask: torch.Tensor
    answers: int  # B: rows [0, B) are answers, rows [B, 2B) foils (when there are foils)

    @property
    def positions(self) -> torch.Tensor:
        """(R, T) each row's absolute positions, counted from its first real token."""
        return position_ids(self.mask)

    @property
    def continuation(self) -> int:
        return self.steps.shape[1]


def layout(prompts: Rows, continuations: Rows, pad: int, device: Any = None) -> Layout:
    """The layout of ``continuations`` (``R = k·B`` rows) after the ``B`` ``prompts`` (repeated ``k`` times)."""
    batch = len(prompts)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token (a BOS, or the text itself)")
    if len(continuations) % batch:
        raise InputError(f"{len(continuations)} continuations for {batch} prompts")
    rows = [prompts[i % batch] for i in range(len(continuations))]
    p, c = max(len(r) for r in prompts), max(len(r) for r in continuations)
    ids = torch.full((len(rows), p + c), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    steps = torch.full((len(rows), c), pad, dtype=torch.long)
    step_mask = torch.zeros_like(steps)
    for i, (prompt, cont) in enumerate(zip(rows, continuations)):
        ids[i, p - len(prompt) : p] = torch.tensor(prompt, dtype=torch.long)
        ids[i, p : p + len(cont)] = torch.tensor(cont, dtype=torch.long)
        mask[i, p - len(prompt) : p + len(cont)] = 1
        steps[i, : len(cont)] = torch.tensor(cont, dtype=torch.long)
        step_mask[i, : len(cont)] = 1
    to = dict(device=device)
    return Layout(ids.to(**to), mask.to(**to), p, steps.to(**to), step_mask.to(**to), batch)


def tensor_rows(ids: Any, mask: Optional[torch.Tensor], what: str) -> Rows:
    """Token rows from a (B, L) integer tensor (real tokens where ``mask`` is 1), a (L,) tensor, or lists."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.dim() not in (1, 2):
            raise InputError(f"{what} must be a (B, L) integer tensor of token ids, got {tuple(ids.shape)} {ids.dtype}")
        ids = ids.view(1, -1) if ids.dim() == 1 else ids
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
                raise InputError(f"attention_mask must have the shape of {what} {tuple(ids.shape)}")
            return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
        return ids.cpu().tolist()
    if isinstance(ids, Sequence) and ids and all(isinstance(t, int) for t in ids):
        return [list(ids)]
    if isinstance(ids, Sequence) and ids and all(isinstance(r, Sequence) for r in ids):
        if all(all(isinstance(t, int) for t in r) for r in ids):
            return [list(r) for r in ids]
    raise InputError(f"{what} must be token ids (a tensor or lists of ints), or strings with tokenizer=")


def as_batch(rows: Rows, batch: int, what: str) -> Rows:
    """One row for every prompt: a single row is shared by every prompt of the batch."""
    if len(rows) == 1 and batch > 1:
        rows = rows * batch
    if len(rows) != batch:
        raise InputError(f"{what} has {len(rows)} rows for {batch} prompts")
    if any(len(r) == 0 for r in rows):
        raise InputError(f"{what} has an empty row: every answer needs at least one token")
    return rows


def _texts(text: Any, what: str) -> List[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, Sequence) and text and all(isinstance(t, str) for t in text):
        return list(text)
    raise InputError(f"{what} must be a string or a list of strings when tokenizer= is given")


def encode_prompts(tokenizer: Any, prompts: Any, chat: bool) -> tuple:
    """``(token rows, texts, special)``: each prompt as the model reads it (BOS and special tokens as the
    tokenizer adds them; with ``chat``, rendered by the chat template as a user turn with the generation
    prompt), the text each row's answer is appended to, and whether the tokenizer adds special tokens to it."""
    texts = _texts(prompts, "the prompt")
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise OptionError(
                f"chat=True, but {type(tokenizer).__name__} has no chat template (tokenizer.chat_template)"
            )
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
    special = not chat  # a rendered template already holds its special tokens
    return [list(tokenizer(t, add_special_tokens=special)["input_ids"]) for t in texts], texts, special


def encode_continuations(tokenizer: Any, texts: List[str], prompt_rows: Rows, answers: Any, special: bool, what: str):
    """Token rows of ``answers`` (strings), each tokenised together with its prompt text: the tokens the joint text
    has after the prompt's own (refused where a token straddles the boundary)."""
    answers = _texts(answers, what)
    if len(answers) == 1 and len(texts) > 1:
        answers = answers * len(texts)
    if len(answers) != len(texts):
        raise InputError(f"{what} has {len(answers)} strings for {len(texts)} prompts")
    rows = []
    for text, prompt, answer in zip(texts, prompt_rows, answers):
        joint = list(tokenizer(text + answer, add_special_tokens=special)["input_ids"])
        end = _common_prefix(prompt, joint)
        if end < len(prompt):
            raise InputError(
                f"the prompt {text[-30:]!r} and the {what} {answer[:30]!r} share a token across their boundary when "
                "tokenised together; start the answer with a space or end the prompt with one, or pass token ids"
            )
        rows.append(_drop_trailing_special(tokenizer, joint[end:], special))
    return rows


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _drop_trailing_special(tokenizer: Any, row: List[int], special: bool) -> List[int]:
    """Tokens a post-processor appends to every text (an EOS some tokenizers add) are not part of the answer."""
    if not special:
        return row
    tail = list(tokenizer("", add_special_tokens=True)["input_ids"])
    trailing = [t for t in tail if t != getattr(tokenizer, "bos_token_id", None)]
    if trailing and row[-len(trailing) :] == trailing:
        return row[: -len(trailing)]
    return row


def pad_id(model: Any, tokenizer: Any = None) -> int:
    """A token id for padding (masked, never read): the tokenizer's or the config's pad, else EOS, else 0."""
    config = getattr(model, "config", None)
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(config, "pad_token_id", None),
        getattr(config, "eos_token_id", None),
    ):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int) and value >= 0:
            return value
    return 0


def eos_ids(model: Any, tokenizer: Any = None) -> List[int]:
    """The end-of-sequence ids (generation config, config, tokenizer)."""
    found: List[int] = []
    for owner in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(owner, "eos_token_id", None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in found:
                found.append(v)
    return found


def generate(model: Any, prompts: Rows, pad: int, eos: List[int], max_new_tokens: int, **options: Any) -> Rows:
    """Greedy answers of ``model`` to ``prompts`` (left-padded, KV cache on), each cut after its first EOS."""
    if not callable(getattr(model, "generate", None)):
        raise OptionError(
            f"answer_ids=None asks to generate the answer, but {type(model).__name__} has no generate(); "
            "pass answer_ids (or answer strings with tokenizer=)"
        )
    if max_new_tokens < 1:
        raise OptionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    get = getattr(model, "get_input_embeddings", None)
    lay = layout(prompts, [[pad]] * len(prompts), pad, input_device(get() if callable(get) else model))
    ids, mask = lay.ids[:, : lay.prompt], lay.mask[:, : lay.prompt]
    options = dict(do_sample=False, use_cache=True, pad_token_id=pad, **options)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **options)
    rows = []
    for row in out[:, lay.prompt :].cpu().tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows
