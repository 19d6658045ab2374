r"""Where AttnLRP conserves relevance and where it leaks, on real-size random-init transformers in float64.

    python -m backprop_hooks.eval.conservation --out eval/results/attnlrp_conservation

For each model and composite the input relevance summed, ``Σ R``, is set against the explained objective
``y_t`` (the logit target; ``t`` the predicted class or next token): ``Σ R / y_t`` (1: conserved), its mean
and range over the samples. "zero biases": every bias of the linear layers and norms, the position
and token-type embeddings and the class token set to zero (they are inputs that no explanation of the
input sees); "as built": the random initialisation, whose biases Hugging Face sets to zero, so that only the
position and token-type embeddings (and ViT's class token) differ. ``Σ R(h_ℓ)/y_t``: the relevance of the
hidden states (Hugging Face's ``hidden_states``: ``h_0`` the embeddings' output, ``h_ℓ`` block ℓ's) over
``y_t``, where along the depth the relevance is lost (1 where every rule above conserves).

Models (Hugging Face, random weights, ``sdpa``): BERT-base-sized classifier (12 layers, width 768, 12 heads,
MLP 3072, 2 classes, L = 64 tokens), GPT-2-small-sized language model (12 layers, width 768; the next
token over 50,257), ViT-Base-sized (12 layers, width 768, 224 px, 16 px patches, 1000 classes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks.rules.attnlrp import get_attnlrp_composite

from . import report

Run = Callable[[torch.Tensor], Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]
CONSTANTS = ("position_embeddings", "token_type_embeddings", "wpe", "cls_token")


def zero_biases(model: nn.Module) -> nn.Module:
    """Every bias, position/token-type embedding and class token of ``model`` set to zero, in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(c in name for c in CONSTANTS):
                p.zero_()
    return model


def relevance_sums(model: nn.Module, x: torch.Tensor, run: Run, composite: str) -> Dict[str, torch.Tensor]:
    """``Σ R`` of the input and of every block's output, and ``y_t``, for the logit of the predicted class.

    The composite's rules are attached and its function-level rules active during the forward pass, as
    ``bh.explain`` does; the backward goes to the input and to every hidden state at once."""
    comp = get_attnlrp_composite(composite)
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad(), bh.attach(model, comp.spec(model)):
        with comp.functions(xg):
            logits, hidden = run(xg)
        classes = logits.detach().argmax(1)
        seed = torch.nn.functional.one_hot(classes, logits.shape[1]).to(logits.dtype)
        grads = torch.autograd.grad(logits, [xg, *hidden], seed)
    sums = [(t.detach() * g).flatten(1).sum(1) for t, g in zip([xg, *hidden], grads)]
    return dict(
        input=sums[0], layers=torch.stack(sums[1:], 1), objective=logits.detach().gather(1, classes[:, None])[:, 0]
    )


def bert(batch: int, length: int) -> Tuple[nn.Module, torch.Tensor, Run]:
    """BERT-base-sized (12 layers, width 768) random-init classifier in float64, its input embeddings and a run."""
    import transformers

    config = transformers.BertConfig(num_labels=2)  # BERT-base: 12 layers, 768, 12 heads, 3072
    model = transformers.BertForSequenceClassification(config).double().eval()
    ids = torch.randint(1000, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach()

    def run(x):
        out = model(inputs_embeds=x, output_hidden_states=True)
        return out.logits, out.hidden_states

    return model, embeds, run


def gpt2(batch: int, length: int) -> Tuple[nn.Module, torch.Tensor, Run]:
    """GPT-2-small-sized random-init language model in float64 (next token), its input embeddings and a run."""
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).double().eval()  # GPT-2 small
    ids = torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach()

    def run(x):
        out = model(inputs_embeds=x, output_hidden_states=True)
        return out.logits[:, -1], out.hidden_states

    return model, embeds, run


def vit(batch: int, length: int) -> Tuple[nn.Module, torch.Tensor, Run]:
    """ViT-Base-sized random-init classifier in float64 (224 px), random pixels and a run."""
    import transformers

    model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).double().eval()
    pixels = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(x):
        out = model(pixel_values=x, output_hidden_states=True)
        return out.logits, out.hidden_states

    return model, pixels, run


MODELS = {"bert_base": bert, "gpt2_small": gpt2, "vit_base": vit}


def measure(name: str, batch: int, length: int) -> List[Dict]:
    """Σ R over the input and each hidden state ÷ ``y_t`` for ``attnlrp`` and ``cp_lrp``, zero biases and as built."""
    rows = []
    for biases in ("zero biases", "as built"):
        torch.manual_seed(0)
        model, x, run = MODELS[name](batch, length)
        if biases == "zero biases":
            zero_biases(model)
        for composite in ("attnlrp", "cp_lrp"):
            sums = relevance_sums(model, x, run, composite)
            ratio = sums["input"] / sums["objective"]
            layers = (sums["layers"] / sums["objective"][:, None]).mean(0)
            rows.append(
                dict(
                    model=name,
                    biases=biases,
                    composite=composite,
                    input_over_objective=float(ratio.mean()),
                    smallest=float(ratio.min()),
                    largest=float(ratio.max()),
                    layers_over_objective=[round(float(v), 4) for v in layers],
                )
            )
            print(rows[-1], file=sys.stderr)
        del model
    return rows


def parser() -> argparse.ArgumentParser:
    """The options of ``python -m backprop_hooks.eval.conservation``."""
    p = argparse.ArgumentParser(
        prog="python -m backprop_hooks.eval.conservation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=64, help="tokens of the text models")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv=None) -> int:
    """Measure every model's conservation, print the table and write it to ``--out`` (results.md, .json)."""
    a = parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [row for name in a.models for row in measure(name, a.batch, a.length)]
    command = "python -m backprop_hooks.eval.conservation " + " ".join(sys.argv[1:] if argv is None else argv)
    table = report.markdown_table(
        ["model", "biases", "composite", "Σ R(input) / y_t: mean", "range", "Σ R(h_ℓ) / y_t, ℓ = 0..L (mean)"],
        [
            [
                r["model"], r["biases"], r["composite"], f"{r['input_over_objective']:.4g}",
                f"{r['smallest']:.4g} … {r['largest']:.4g}",
                " ".join(f"{v:.3f}" for v in r["layers_over_objective"]),
            ]
            for r in rows
        ],
    )  # fmt: skip
    text = f"# AttnLRP conservation (float64, random init)\n\ncommand: `{command}`\n\n{table}\n"
    print(text)
    if a.out is not None:
        report.write_text(a.out / "results.md", text)
        report.write_json(a.out / "results.json", dict(command=command, rows=rows, versions=report.versions()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
