"""A small text classifier of our own, trained offline: which part of the Python reference manual a sentence
comes from (exceptions, strings, numbers, containers).

    python -m backprop_hooks.models.text_topics          # train (~1 min on one core) and write the weights

Data: the help topics that ship with every CPython (``pydoc_data.topics``, the text of ``help("try")``,
...), split into sentences, lower-cased words; topics grouped into 4 classes (:data:`CLASSES`); every 5th
sentence of each class is held out for the test accuracy. Model: a 2-layer Hugging Face BERT
(``BertForSequenceClassification``, hidden size 48, 2 heads, ``sdpa`` attention) on a word vocabulary of
the training sentences (words seen at least twice), ``[CLS]`` first, right padding. The shipped file
(``weights/python_docs_topics.pt``, < 1 MB) holds the state dict, the vocabulary and the config, loaded
with ``torch.load(..., weights_only=True)``; the data set depends on the CPython version's help text
(trained on 3.11), the shipped model does not.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .zoo import WEIGHTS_DIR

#: The four classes and the help topics (``pydoc_data.topics``) whose sentences make up each.
CLASSES: Dict[str, Tuple[str, ...]] = {
    "exceptions": ("try", "raise", "exceptions", "assert"),
    "strings": ("strings", "string-methods", "formatstrings"),
    "numbers": ("numeric-types", "integers", "floating", "power", "binary", "bitwise", "unary", "numbers"),
    "containers": ("typesseq", "typesseq-mutable", "typesmapping", "dict", "slicings", "subscriptions", "lists"),
}
PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
MAX_WORDS = 40
WEIGHTS = WEIGHTS_DIR / "python_docs_topics.pt"
CONFIG = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=96,
    max_position_embeddings=MAX_WORDS + 1,
    type_vocab_size=1,
    pad_token_id=0,
)


def words(text: str) -> List[str]:
    """Lower-cased words, identifiers and numbers of ``text``."""
    return re.findall(r"[a-z_][a-z0-9_]*|\d+", text.lower())


def sentences(text: str) -> List[str]:
    """The sentences of a help text, split after '.', '!', '?' or ':' before a capital, quote or bracket."""
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?:])\s+(?=[A-Z*\"'(])", flat) if s.strip()]


def dataset() -> Tuple[List[Tuple[List[str], int]], List[Tuple[List[str], int]]]:
    """(train, test) lists of (words, class index); every 5th sentence of each class is a test sentence."""
    from pydoc_data.topics import topics

    train, test = [], []
    for label, names in enumerate(CLASSES.values()):
        seen = set()
        items = []
        for name in names:
            for s in sentences(topics.get(name, "")):
                w = words(s)[:MAX_WORDS]
                if len(w) >= 5 and tuple(w) not in seen:
                    seen.add(tuple(w))
                    items.append((w, label))
        test += items[::5]
        train += [item for i, item in enumerate(items) if i % 5]
    return train, test


@dataclass
class Tokenizer:
    """Word-level: ``[CLS]`` + the sentence's words, unknown words ``[UNK]``, right padding with ``[PAD]`` (0)."""

    vocab: List[str]

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def fit(cls, texts: Sequence[List[str]], min_count: int = 2) -> "Tokenizer":
        counts: Dict[str, int] = {}
        for w in (w for t in texts for w in t):
            counts[w] = counts.get(w, 0) + 1
        return cls([PAD, UNK, CLS] + sorted(w for w, c in counts.items() if c >= min_count))

    def tokens(self, text) -> List[str]:
        """The tokens the model sees for ``text`` (a string or a list of words)."""
        ws = words(text) if isinstance(text, str) else list(text)
        return [CLS] + [w if w in self.index else UNK for w in ws[:MAX_WORDS]]

    def __call__(self, texts) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both (B, L) long, for a string or a list of them (or of word lists)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        toks = [self.tokens(t) for t in batch]
        length = max(len(t) for t in toks)
        ids = torch.zeros(len(toks), length, dtype=torch.long)
        mask = torch.zeros(len(toks), length, dtype=torch.long)
        for i, t in enumerate(toks):
            ids[i, : len(t)] = torch.tensor([self.index[w] for w in t])
            mask[i, : len(t)] = 1
        return ids, mask


def build(vocab_size: int):
    """A random-init BERT classifier of the shipped shape (``CONFIG``), ``vocab_size`` words, the four classes."""
    import transformers

    config = transformers.BertConfig(vocab_size=vocab_size, num_labels=len(CLASSES), **CONFIG)
    config.id2label = dict(enumerate(CLASSES))
    config.label2id = {c: i for i, c in enumerate(CLASSES)}
    return transformers.BertForSequenceClassification(config)


def accuracy(model, tokenizer: Tokenizer, data) -> float:
    """The fraction of ``data`` ((words, class) pairs) that ``model`` classifies right."""
    model.eval()
    with torch.no_grad():
        ids, mask = tokenizer([w for w, _ in data])
        pred = model(ids, attention_mask=mask).logits.argmax(1)
    return float((pred == torch.tensor([c for _, c in data])).double().mean())


def train(epochs: int = 30, seed: int = 0, batch_size: int = 32, lr: float = 3e-3):
    """Train from scratch: ``(model in eval mode, tokenizer, test accuracy)``. One CPU thread, deterministic."""
    torch.set_num_threads(1)
    train_set, test_set = dataset()
    tokenizer = Tokenizer.fit([w for w, _ in train_set])
    torch.manual_seed(seed)
    model = build(len(tokenizer.vocab))
    ids, mask = tokenizer([w for w, _ in train_set])
    labels = torch.tensor([c for _, c in train_set])
    counts = torch.bincount(labels, minlength=len(CLASSES)).double()
    weight = (counts.sum() / (len(CLASSES) * counts)).float()  # balanced classes

    def loss_of(b_ids: torch.Tensor, b_mask: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        out = model(b_ids, attention_mask=b_mask).logits
        return torch.nn.functional.cross_entropy(out, labels[batch], weight=weight)

    fit(model, ids, mask, loss_of, epochs, seed, batch_size, lr)
    return model, tokenizer, accuracy(model, tokenizer, test_set)


def shuffled(lengths: torch.Tensor, batch_size: int, g: torch.Generator) -> List[torch.Tensor]:
    """An epoch's batches of sequence indices: a random order cut into ``batch_size`` pieces."""
    return list(torch.randperm(len(lengths), generator=g).split(batch_size))


def fit(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    loss_of,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    batches: Callable[[torch.Tensor, int, torch.Generator], List[torch.Tensor]] = shuffled,
):
    """Train ``model`` in place (AdamW, a one-cycle schedule) on ``batches(lengths, batch_size, generator)`` of
    ``(ids, mask)`` per epoch (:func:`shuffled` by default), each cut to its longest sequence;
    ``loss_of(batch_ids, batch_mask, batch)`` is a batch's loss (``batch``: its indices). Leaves the model in
    eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(ids) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    lengths = mask.sum(1)
    for _ in range(epochs):
        model.train()
        for batch in batches(lengths, batch_size, g):
            used = int(mask[batch].sum(1).max())
            loss = loss_of(ids[batch, :used], mask[batch, :used], batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def save(model, tokenizer: Tokenizer, path: Path, test_accuracy: float) -> None:
    """Write the weights (float16, under 1 MB), the vocabulary and the test accuracy to ``path``."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}  # < 1 MB
    torch.save(dict(state_dict=state, vocab=tokenizer.vocab, test_accuracy=test_accuracy), path)


def load(path: Path = WEIGHTS) -> Tuple[torch.nn.Module, Tokenizer]:
    """The shipped classifier (float32, eval mode, ``sdpa`` attention) and its tokenizer."""
    from backprop_hooks.errors import WeightsUnavailableError

    if not Path(path).is_file():
        raise WeightsUnavailableError(
            f"no weights at {path}; train them with: python -m backprop_hooks.models.text_topics"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    tokenizer = Tokenizer(list(checkpoint["vocab"]))
    model = build(len(tokenizer.vocab))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()})
    return model.eval(), tokenizer


def main(argv=None) -> int:
    """Train the classifier and write its weights (``python -m backprop_hooks.models.text_topics``)."""
    p = argparse.ArgumentParser(prog="python -m backprop_hooks.models.text_topics", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--epochs", type=int, default=30)
    a = p.parse_args(argv)
    started = time.perf_counter()
    model, tokenizer, acc = train(epochs=a.epochs)
    save(model, tokenizer, a.out, acc)
    train_set, test_set = dataset()
    print(
        f"{a.out}: test accuracy {acc:.4f} on {len(test_set)} sentences ({len(train_set)} for training), "
        f"vocabulary {len(tokenizer.vocab)}, {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
