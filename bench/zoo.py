"""Models for the benchmarks (random weights: timing does not depend on them) and their CAM layers."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

CNN_METHODS = [
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "gradcam",
    "xgradcam",
    "linear_approx",
    "fullgrad",
    "guided_backprop",
    "lrp",
]
VIT_METHODS = ["rollout", "grad_rollout", "transformer_attribution", "vit_gradcam", "attnlrp"]
METHOD_OPTIONS = {"integrated_gradients": {"n_steps": 16}, "smoothgrad": {"n_samples": 16}}
LAYERS = {
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "vgg16_bn": "features.43",
    "vgg16": "features.30",
    "vgg11_bn": "features.27",
    "vit_tiny": "blocks.10",
}


HF_TEXT = {"bert_small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048)}
# causal language models (the next token's logits over a 1000-token vocabulary), where LXT runs too
HF_CAUSAL = {
    "gpt2_small": dict(n_embd=512, n_layer=4, n_head=8, bos_token_id=0, eos_token_id=0),
    "llama_small": dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
    ),
}


class HFLogits(nn.Module):
    """A Hugging Face model whose forward returns its ``.logits`` tensor (the floors need a tensor; the
    explanation methods read ``.logits`` themselves). Text models take their input embeddings (B, L, D):
    ``bh.explain_text`` runs them the same way, after one embedding lookup."""

    def __init__(self, model: nn.Module, text: bool = False, causal: bool = False):
        super().__init__()
        self.model, self.text, self.causal = model, text, causal

    def forward(self, x):
        if self.text:
            logits = self.model(inputs_embeds=x).logits
            return logits[:, -1] if self.causal else logits
        size = self.model.config.image_size
        resize = tuple(x.shape[-2:]) != (size, size)  # as timm's dynamic_img_size: the position grid follows x
        return self.model(pixel_values=x, interpolate_pos_encoding=resize).logits

    def token_layout(self, x):
        from backprop_hooks.methods.tokens import TextLayout, token_layout

        if self.text:
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
            return TextLayout(mask, "last" if self.causal else "first")
        return token_layout(self.model, x)


def _hf(base: str, num_classes: int) -> nn.Module:
    import transformers

    if base == "hf_vit":  # ViT-Tiny's shape (as timm's vit_tiny_patch16_224), Hugging Face's default sdpa
        config = transformers.ViTConfig(
            hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, num_labels=num_classes
        )
        return HFLogits(transformers.ViTForImageClassification(config))
    if base == "gpt2_small":
        config = transformers.GPT2Config(vocab_size=1000, **HF_CAUSAL[base])
        return HFLogits(transformers.GPT2LMHeadModel(config), text=True, causal=True)
    if base == "llama_small":
        config = transformers.LlamaConfig(vocab_size=1000, **HF_CAUSAL[base])
        return HFLogits(transformers.LlamaForCausalLM(config), text=True, causal=True)
    config = transformers.BertConfig(vocab_size=1000, num_labels=num_classes, **HF_TEXT[base])
    return HFLogits(transformers.BertForSequenceClassification(config), text=True)


def make_input(name: str, model: nn.Module, batch: int, size: int, device: torch.device) -> torch.Tensor:
    """Images (B, 3, size, size) in [0, 1]; for a text model, input embeddings (B, L, D) with L = min(size, 512)."""
    if isinstance(model, HFLogits) and model.text:
        hidden = model.model.config.hidden_size
        return 0.02 * torch.randn(batch, min(size, 512), hidden, device=device)
    return torch.rand(batch, 3, size, size, device=device)


def depth_of(name: str) -> int:
    """Number of blocks/layers a benchmark model name stands for (``vit_tiny_d6``: 6, ``vit_tiny``: 12,
    ``resnet34``: 34)."""
    base = name.partition("@")[0]
    if base.startswith("vit_tiny"):
        return int(base.split("_d")[1]) if "_d" in base else 12
    digits = "".join(ch for ch in base if ch.isdigit())
    return int(digits) if digits else 0


def build(name: str, device: torch.device) -> Tuple[nn.Module, Optional[str], int, bool]:
    """``name`` or ``name@C`` (C classes) -> (model in eval mode, CAM layer, number of classes, is a
    transformer: the attention methods apply). ``vit_tiny``: timm's ViT-Tiny (fused attention; ``vit_tiny_dN``:
    N blocks); ``tv_vit``: torchvision's ViT with ViT-Tiny's shape (``nn.MultiheadAttention``); ``hf_vit``: a
    Hugging Face ViT (sdpa); ``bert_small``: a 4-layer BERT classifier (sdpa) on input embeddings;
    ``gpt2_small``, ``llama_small``: 4-layer causal language models (sdpa) on input embeddings, the next
    token's logits (1000 classes: the vocabulary); other names: torchvision models (``resnet18``,
    ``vgg11_bn``, ...)."""
    base, _, classes = name.partition("@")
    num_classes = int(classes) if classes else 1000
    torch.manual_seed(0)
    if base in HF_CAUSAL:
        return _hf(base, 1000).eval().to(device), None, 1000, True
    if base == "hf_vit" or base in HF_TEXT:
        num_classes = num_classes if classes or base == "hf_vit" else 2  # a text classifier: 2 classes
        return _hf(base, num_classes).eval().to(device), None, num_classes, True
    if base.startswith("vit_tiny"):  # vit_tiny_dN: N blocks
        import timm

        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=num_classes,
            dynamic_img_size=True,
            depth=depth_of(base),
        )
        is_vit = True
    elif base == "tv_vit":  # ViT-Tiny's shape: 12 layers, width 192, 3 heads, 16 px patches
        import torchvision

        model = torchvision.models.VisionTransformer(
            image_size=224,
            patch_size=16,
            num_layers=12,
            num_heads=3,
            hidden_dim=192,
            mlp_dim=768,
            num_classes=num_classes,
        )
        nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zeroes the head: every logit would be equal
        is_vit = True
    else:
        import torchvision

        model = getattr(torchvision.models, base)(weights=None, num_classes=num_classes)
        is_vit = False
    return model.eval().to(device), LAYERS.get(base), num_classes, is_vit
