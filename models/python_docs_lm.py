"""A tiny GPT-2-style language model of our own, with its own byte-level BPE tokenizer, trained offline on the
help text that ships with CPython: a real Hugging Face pair (``generate``, chat template, Inseq, Captum all run
on it), small enough to ship and to explain on a CPU.

    python -m backprop_hooks.models.python_docs_lm          # train (a few minutes on one core), write the pair

Data: every help topic of ``pydoc_data.topics`` (the text of ``help("try")``, ...), split into sentences by
:func:`backprop_hooks.models.text_topics.sentences`, original case, sentences of at least 4 words,
duplicates dropped; every 5th sentence is held out. Tokenizer: byte-level BPE in the GPT-2 style (`tokenizers`,
trained on the training sentences; " Paris" and "Paris" are different tokens), :data:`VOCAB_SIZE` tokens,
``<|endoftext|>`` as BOS and EOS, ``<|pad|>`` for padding (right, as GPT-2; choose left for batched
generation); its post-processor puts BOS before every sequence, as Llama's does; a plain chat template.
Training sequences: one sentence each, ``BOS sentence EOS`` (at most :data:`MAX_TOKENS`; a longer sentence is
cut and loses its EOS). Model: a Hugging Face ``GPT2LMHeadModel`` (:data:`CONFIG`, tied input and output
embeddings, ``sdpa`` attention), float32. Shipped as a ``save_pretrained`` directory (:data:`DIRECTORY`), so
``AutoModelForCausalLM.from_pretrained(DIRECTORY)`` and ``AutoTokenizer.from_pretrained(DIRECTORY)`` load it
offline.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from .text_topics import fit, sentences, words
from .zoo import WEIGHTS_DIR

#: The shipped pair's ``save_pretrained`` folder: ``AutoModelForCausalLM.from_pretrained(DIRECTORY)`` loads it.
DIRECTORY = WEIGHTS_DIR / "python_docs_lm"
BOS, PAD = "<|endoftext|>", "<|pad|>"  # BOS and EOS are one token, as GPT-2's
#: The tokenizer's vocabulary size (byte-level BPE, special tokens included).
VOCAB_SIZE = 2048
#: The longest training sequence and the model's positions (``n_positions``).
MAX_TOKENS = 128
#: The ``GPT2Config`` fields of the shipped model.
CONFIG = dict(n_embd=96, n_layer=2, n_head=2, n_positions=MAX_TOKENS)
#: The tokenizer's chat template: ``role: content`` lines, then ``assistant:`` for the generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def dataset() -> Tuple[List[str], List[str]]:
    """(train, test) sentences of every help topic, original text; every 5th sentence is a test sentence."""
    from pydoc_data.topics import topics

    seen, items = set(), []
    for name in sorted(topics):
        for s in sentences(topics[name]):
            if len(words(s)) >= 4 and s not in seen:
                seen.add(s)
                items.append(s)
    return [s for i, s in enumerate(items) if i % 5], items[::5]


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` learnt on ``texts``: BOS added before every sequence."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer)
    bos = core.token_to_id(BOS)
    core.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=False, trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos)]),
        ]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        padding_side="right",
        model_max_length=MAX_TOKENS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: GPT-2 would embed them as tokens
    )


def build(tokenizer):
    """A fresh ``GPT2LMHeadModel`` (:data:`CONFIG`) for ``tokenizer``'s vocabulary, greedy generation by default."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        **CONFIG,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def encode(tokenizer, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``BOS text EOS`` per text (the tokenizer adds BOS), cut to
    :data:`MAX_TOKENS`, right-padded."""
    cut = tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)["input_ids"]
    rows = [r + [tokenizer.eos_token_id] if len(r) < MAX_TOKENS else r for r in cut]
    batch = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def labels_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The next-token targets: the ids themselves (the model shifts them), padding ignored (-100)."""
    return ids.masked_fill(mask == 0, -100)


def by_length(lengths: torch.Tensor, batch_size: int, g: torch.Generator) -> List[torch.Tensor]:
    """An epoch's batches of sentences of similar lengths (less padding): a random order cut into pools of 16
    batches, each pool sorted by length and cut into batches, the batches shuffled."""
    pools = torch.randperm(len(lengths), generator=g).split(16 * batch_size)
    batches = [b for pool in pools for b in pool[lengths[pool].argsort(stable=True)].split(batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def evaluate(model, tokenizer, texts: Sequence[str]) -> Tuple[float, float]:
    """(top-1 next-token accuracy, perplexity) over every token of ``texts`` after BOS, the closing EOS included."""
    model.eval()
    ids, mask = encode(tokenizer, texts)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, :-1]
    target, real = ids[:, 1:], mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[real], target[real])
    accuracy = (logits.argmax(-1)[real] == target[real]).double().mean()
    return float(accuracy), math.exp(float(nll))


def train(epochs: int = 40, seed: int = 0, batch_size: int = 32, lr: float = 3e-3):
    """Train tokenizer and model from scratch: ``(model in eval mode, tokenizer, test accuracy, test perplexity)``.
    One CPU thread, deterministic given ``seed``."""
    torch.set_num_threads(1)
    train_set, test_set = dataset()
    tokenizer = train_tokenizer(train_set)
    torch.manual_seed(seed)
    model = build(tokenizer)
    ids, mask = encode(tokenizer, train_set)

    def loss_of(b_ids: torch.Tensor, b_mask: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return model(b_ids, attention_mask=b_mask, labels=labels_of(b_ids, b_mask)).loss

    fit(model, ids, mask, loss_of, epochs, seed, batch_size, lr, batches=by_length)
    return (model, tokenizer, *evaluate(model, tokenizer, test_set))


def save(model, tokenizer, directory: Path) -> Path:
    """Write the pair with ``save_pretrained`` (safetensors, float32) into ``directory``, the chat template in
    ``tokenizer_config.json`` and the tokenizer class named ``PreTrainedTokenizerFast`` (what transformers 4
    and 5 both load)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory, save_jinja_files=False)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def load(directory: Path = DIRECTORY):
    """The shipped pair: ``(model, tokenizer)``, the ``GPT2LMHeadModel`` in eval mode (float32, ``sdpa``) and its
    ``PreTrainedTokenizerFast``, read from ``directory`` with ``from_pretrained`` (no download)."""
    import transformers

    from backprop_hooks.errors import WeightsUnavailableError

    if not (Path(directory) / "config.json").is_file():
        raise WeightsUnavailableError(
            f"no language model at {directory}; train it with: python -m backprop_hooks.models.python_docs_lm"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return model.eval(), tokenizer


def main(argv=None) -> int:
    """Train the pair and write it (``python -m backprop_hooks.models.python_docs_lm``): the folder ``--out``."""
    p = argparse.ArgumentParser(
        prog="python -m backprop_hooks.models.python_docs_lm", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", type=Path, default=DIRECTORY, help="the directory to write (save_pretrained)")
    p.add_argument("--epochs", type=int, default=40)
    a = p.parse_args(argv)
    started = time.perf_counter()
    model, tokenizer, accuracy, perplexity = train(epochs=a.epochs)
    save(model, tokenizer, a.out)
    train_set, test_set = dataset()
    size = sum(f.stat().st_size for f in Path(a.out).iterdir())
    print(
        f"{a.out}: held-out next-token accuracy {accuracy:.4f}, perplexity {perplexity:.1f} on {len(test_set)} "
        f"sentences ({len(train_set)} for training), vocabulary {len(tokenizer)}, "
        f"{sum(p.numel() for p in model.parameters())} parameters, {size / 1e6:.2f} MB, "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
