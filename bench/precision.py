"""How close the text methods stay to float64 on half-precision language models:
``python -m bench.precision [--quick] [--out FILE]``.

For random-init GPT-2 and Llama models built from configs (no download) at a few sizes, each text method's
token scores (``bh.explain_text``, next token, ``target="weighted"``) of the model in ``bfloat16``,
``float16`` and ``float32`` are compared with those of the same weights in ``float64`` (the half-precision
weights cast up, so only the arithmetic differs): the relative error ``‖φ − φ64‖ / ‖φ64‖``, the largest over
a few inputs, for the float64 model's next token (a near tie of random-init logits may flip in half precision).
SmoothGrad draws its noise in ``float32`` for half-precision models, so its reference is the model in
``float32`` (same noise). Prints a markdown table (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import transformers

import backprop_hooks as bh
from backprop_hooks.text import TEXT_METHODS

OPTIONS = {"smoothgrad": dict(n_samples=8, seed=0), "integrated_gradients": dict(n_steps=16)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIZES = {  # name -> (hidden, layers, heads, sequence length)
    "tiny": (32, 2, 2, 8),
    "small": (128, 4, 4, 32),
    "medium": (256, 6, 8, 64),
}
VOCAB = 512


def build(kind: str, hidden: int, layers: int, heads: int, seed: int = 0) -> torch.nn.Module:
    """A random-init GPT-2 or Llama (grouped-query attention) in float64, eval mode, dropout 0."""
    torch.manual_seed(seed)
    t = transformers
    if kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256)
        model = t.GPT2LMHeadModel(cfg)
    else:
        cfg = t.LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=256,
            pad_token_id=0,
        )  # fmt: skip
        model = t.LlamaForCausalLM(cfg)
    return model.double().eval()


def next_token(out):
    return out.logits[:, -1]


def scores(model: torch.nn.Module, ids: torch.Tensor, method: str, classes: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)
        options = OPTIONS.get(method, {})
        e = bh.explain_text(model, ids, method=method, target="weighted", classes=classes, logits=next_token, **options)
    return e.attributions.double()


def relative_errors(kind: str, size: str, dtype: torch.dtype, n_inputs: int) -> Dict[str, float]:
    """method -> the largest relative error over ``n_inputs`` batches of 2 random sequences."""
    hidden, layers, heads, length = SIZES[size]
    model = build(kind, hidden, layers, heads).to(dtype)
    reference = copy.deepcopy(model).double()  # the same (rounded) weights, float64 arithmetic
    reference32 = copy.deepcopy(model).float()
    worst: Dict[str, float] = {}
    for seed in range(n_inputs):
        ids = torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():  # the float64 model's next token (a near tie may flip in half precision)
            classes = next_token(reference(ids)).argmax(-1)
        for method in TEXT_METHODS:
            expected = scores(reference32 if method == "smoothgrad" else reference, ids, method, classes)
            got = scores(model, ids, method, classes)
            if not bool(torch.isfinite(got).all()):
                worst[method] = float("inf")
                continue
            err = float((got - expected).norm() / expected.norm().clamp_min(1e-300))
            worst[method] = max(worst.get(method, 0.0), err)
    return worst


def table(rows: List[Tuple[str, str, str, Dict[str, float]]]) -> str:
    head = "| model | size | dtype | " + " | ".join(TEXT_METHODS) + " |"
    lines = [head, "|" + "---|" * (3 + len(TEXT_METHODS))]
    for kind, size, dtype, errs in rows:
        cells = " | ".join(f"{errs[m]:.1e}" for m in TEXT_METHODS)
        lines.append(f"| {kind} | {size} | {dtype} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny models and one input only")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--inputs", type=int, default=3, help="batches of 2 sequences per model")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    sizes, n_inputs = (["tiny"], 1) if args.quick else (args.sizes, args.inputs)
    rows = []
    for kind in ("gpt2", "llama"):
        for size in sizes:
            for name in args.dtypes:
                rows.append((kind, size, name, relative_errors(kind, size, DTYPES[name], n_inputs)))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print("\n" + text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
