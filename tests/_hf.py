"""Small random-init Hugging Face models built from configs offline (2 layers, hidden size 32), float64."""

import logging

import torch
import transformers

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 40
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
VISION = dict(image_size=32, patch_size=8, num_channels=3, num_labels=5, **TEXT)


def build(name: str, attn: str = "sdpa", seed: int = 0):
    """``name`` in TEXT_MODELS or VISION_MODELS, built with ``attn_implementation=attn``, eval mode, float64."""
    torch.manual_seed(seed)
    t = transformers
    if name == "bert":
        model = t.BertForSequenceClassification(t.BertConfig(vocab_size=VOCAB, num_labels=3, pad_token_id=0, **TEXT))
    elif name == "roberta":
        cfg = t.RobertaConfig(vocab_size=VOCAB, num_labels=3, pad_token_id=1, max_position_embeddings=40, **TEXT)
        model = t.RobertaForSequenceClassification(cfg)
    elif name == "distilbert":
        cfg = t.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3)
        model = t.DistilBertForSequenceClassification(cfg)
    elif name == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0)
        cfg.eos_token_id = 0
        model = t.GPT2LMHeadModel(cfg)
    elif name == "llama":  # grouped-query attention (4 query heads, 2 key/value heads), RMSNorm, SiLU-gated MLP
        cfg = t.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
        )  # fmt: skip
        model = t.LlamaForCausalLM(cfg)
    elif name == "gemma3":  # RMSNorm scaled by (1 + weight), q/k norms, GELU-tanh-gated MLP, scaled embeddings
        cfg = t.Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=32, sliding_window=4, pad_token_id=0,
        )  # fmt: skip
        model = t.Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # Gemma's norm weights start at 0 (a scale of 1): give them scales to explain
            for key, p in model.named_parameters():
                if "norm" in key:
                    p.normal_(0.0, 0.3)
    elif name == "bloom":  # ALiBi (no position ids) and attention that declares no is_causal
        model = t.BloomForCausalLM(t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=2, pad_token_id=0))
    elif name == "vit":
        model = t.ViTForImageClassification(t.ViTConfig(**VISION))
    elif name == "deit":
        model = t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**VISION))
    elif name == "beit":
        model = t.BeitForImageClassification(t.BeitConfig(use_relative_position_bias=True, **VISION))
    else:
        raise ValueError(name)
    model.set_attn_implementation(attn)
    return model.double().eval()


TEXT_MODELS = ["bert", "roberta", "distilbert", "gpt2"]
VISION_MODELS = ["vit", "deit", "beit"]


def text_inputs(name: str, batch: int = 3, length: int = 7, seed: int = 1):
    """Token ids (2..VOCAB-1) and a right-padded mask: sample i has length - i real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        mask[i, length - i :] = 0
    pad = 1 if name == "roberta" else 0
    return ids.masked_fill(mask == 0, pad), mask


def pixels(batch: int = 2, seed: int = 1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def model_inputs(name: str):
    if name in VISION_MODELS:
        return {"pixel_values": pixels()}
    ids, mask = text_inputs(name)
    return {"input_ids": ids, "attention_mask": mask}
