"""A tiny GPT-2-style language model of our own, trained offline on the help text that ships with CPython: it
predicts the next word, so that a language model's next token can be explained ("why this word and not the
others") with real, if small, knowledge behind it.

    python -m backprop_hooks.models.python_docs_lm          # train (a few minutes on one core), write the weights

Data: every help topic of ``pydoc_data.topics`` (the text of ``help("try")``, ...), split into sentences and
lower-cased words by :mod:`backprop_hooks.models.text_topics` (its ``sentences`` and ``words``), sentences of
at least 4 words, duplicates dropped; every 5th sentence is held out. Tokenizer: ``text_topics.Tokenizer``
(words seen at least 3 times in the training sentences, ``[UNK]`` otherwise; its ``[CLS]`` opens every
sentence and serves as the start token). Model: a Hugging Face ``GPT2LMHeadModel``, 2 layers, width 64,
2 heads, tied input and output embeddings, ``sdpa`` attention. The shipped file
(``weights/python_docs_lm.pt``, float16 values, < 1 MB) holds the state dict, the vocabulary and the held-out
metrics, loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import List, Tuple

import torch

from .text_topics import CLS, MAX_WORDS, PAD, Tokenizer, fit, sentences, words
from .zoo import WEIGHTS_DIR

WEIGHTS = WEIGHTS_DIR / "python_docs_lm.pt"
CONFIG = dict(n_embd=64, n_layer=2, n_head=2, n_positions=MAX_WORDS + 1)
MIN_COUNT = 3


def dataset() -> Tuple[List[List[str]], List[List[str]]]:
    """(train, test) word lists of every help topic's sentences; every 5th sentence is a test sentence."""
    from pydoc_data.topics import topics

    seen, items = set(), []
    for name in sorted(topics):
        for s in sentences(topics[name]):
            w = words(s)[:MAX_WORDS]
            if len(w) >= 4 and tuple(w) not in seen:
                seen.add(tuple(w))
                items.append(w)
    return [w for i, w in enumerate(items) if i % 5], items[::5]


def build(tokenizer: Tokenizer):
    """A random-init GPT-2 of the shipped shape (``CONFIG``) over ``tokenizer``'s vocabulary."""
    import transformers

    start, pad = tokenizer.index[CLS], tokenizer.index[PAD]
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer.vocab), bos_token_id=start, eos_token_id=start, pad_token_id=pad, **CONFIG
    )
    return transformers.GPT2LMHeadModel(config)


def labels_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The next-word targets: the ids themselves (the model shifts them), padding ignored (-100)."""
    return ids.masked_fill(mask == 0, -100)


def evaluate(model, tokenizer: Tokenizer, data: List[List[str]]) -> Tuple[float, float]:
    """(top-1 next-word accuracy, perplexity) over every word of ``data`` after the start token."""
    model.eval()
    ids, mask = tokenizer(data)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, :-1]
    target, real = ids[:, 1:], mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[real], target[real])
    accuracy = (logits.argmax(-1)[real] == target[real]).double().mean()
    return float(accuracy), math.exp(float(nll))


def train(epochs: int = 40, seed: int = 0, batch_size: int = 32, lr: float = 3e-3):
    """Train from scratch: ``(model in eval mode, tokenizer, test accuracy, test perplexity)``. One CPU thread."""
    torch.set_num_threads(1)
    train_set, test_set = dataset()
    tokenizer = Tokenizer.fit(train_set, min_count=MIN_COUNT)
    torch.manual_seed(seed)
    model = build(tokenizer)
    ids, mask = tokenizer(train_set)

    def loss_of(b_ids: torch.Tensor, b_mask: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return model(b_ids, attention_mask=b_mask, labels=labels_of(b_ids, b_mask)).loss

    fit(model, ids, mask, loss_of, epochs, seed, batch_size, lr)
    return (model, tokenizer, *evaluate(model, tokenizer, test_set))


def save(model, tokenizer: Tokenizer, path: Path, accuracy: float, perplexity: float) -> None:
    """Write the weights (float16, under 1 MB), the vocabulary, the test accuracy and perplexity to ``path``."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}  # < 1 MB
    torch.save(dict(state_dict=state, vocab=tokenizer.vocab, test_accuracy=accuracy, test_perplexity=perplexity), path)


def load(path: Path = WEIGHTS):
    """The shipped language model (float32, eval mode, ``sdpa`` attention) and its tokenizer."""
    from backprop_hooks.errors import WeightsUnavailableError

    if not Path(path).is_file():
        raise WeightsUnavailableError(
            f"no weights at {path}; train them with: python -m backprop_hooks.models.python_docs_lm"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    tokenizer = Tokenizer(list(checkpoint["vocab"]))
    model = build(tokenizer)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()})
    return model.eval(), tokenizer


def main(argv=None) -> int:
    """Train the language model and write its weights (``python -m backprop_hooks.models.python_docs_lm``)."""
    p = argparse.ArgumentParser(
        prog="python -m backprop_hooks.models.python_docs_lm", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--epochs", type=int, default=40)
    a = p.parse_args(argv)
    started = time.perf_counter()
    model, tokenizer, accuracy, perplexity = train(epochs=a.epochs)
    save(model, tokenizer, a.out, accuracy, perplexity)
    train_set, test_set = dataset()
    print(
        f"{a.out}: held-out next-word accuracy {accuracy:.4f}, perplexity {perplexity:.1f} on {len(test_set)} "
        f"sentences ({len(train_set)} for training), vocabulary {len(tokenizer.vocab)}, "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
