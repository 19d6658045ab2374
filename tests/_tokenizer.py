"""A small byte-level BPE tokenizer trained here (``tokenizers``) on CPython's help text, as a Hugging Face
``PreTrainedTokenizerFast`` that adds BOS to every text and has a chat template; and a random-init GPT-2 of its
vocabulary (float64). Offline, about a second."""

import functools

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, PAD = "<|endoftext|>", "<pad>"
CHAT = (
    "{% for m in messages %}" + BOS + "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@functools.lru_cache(maxsize=None)
def tokenizer(vocab_size: int = 400) -> transformers.PreTrainedTokenizerFast:
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)[:60]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=PAD)
    fast.chat_template = CHAT
    return fast


def gpt2(seed: int = 0):
    tok = tokenizer()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=0, eos_token_id=0,
        pad_token_id=1,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double().eval()
