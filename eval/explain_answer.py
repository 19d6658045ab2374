"""`backprop-hooks explain-answer`: why a language model gave this answer (and not another one).

The bundled language model (``backprop_hooks.models.python_docs_lm``, a small GPT-2 trained here on the
help text that ships with CPython, with its own tokenizer), or any Hugging Face causal LM saved in a folder
(``--model DIR``, loaded offline with ``AutoModelForCausalLM`` / ``AutoTokenizer``), answers ``--prompt``; the
answer is ``--answer`` (else the model's own greedy answer, ``--max-new-tokens``) and is explained with
``bh.explain_generation``: every answer token's ``--target`` over the tokens before it, and the whole answer
in one backward pass (against ``--foil``: ``log p(answer) − log p(foil)``, each scored in its own context).
Writes ``answer.png`` (the heat-map), ``answer.html`` (the same as a page) and ``answer.json`` (the numbers)
into ``--out``, and prints the answer and the prompt tokens that speak most for and against it:

    backprop-hooks explain-answer --prompt "A break statement" --answer " terminates" --foil " continues"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Tuple

import backprop_hooks as bh
from backprop_hooks.errors import UsageError, WeightsUnavailableError
from backprop_hooks.generation import GENERATION_METHODS

DEFAULT_PROMPT = 'A "break" statement executed in the first suite terminates the loop without executing the'


def load(model: Any) -> Tuple[Any, Any]:
    """``(model, tokenizer)``: the bundled pair (``model=None``) or a Hugging Face folder, in eval mode."""
    if model is None:
        from backprop_hooks.models import python_docs_lm

        return python_docs_lm.load()
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the command prints its own lines
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        lm = transformers.AutoModelForCausalLM.from_pretrained(model)
    except OSError as exc:
        raise WeightsUnavailableError(
            f"could not load a causal language model and its tokenizer from {model!r} ({exc}); give a folder written "
            "by save_pretrained, or a hub name with a network"
        ) from exc
    return lm.eval(), tokenizer


def strongest(g, k: int = 5) -> Tuple[list, list]:
    """The ``k`` prompt tokens that speak most for and against the answer: ``[(token, score), ...]`` each."""
    tokens = g.tokens()[0][: g.prompt_length]
    scores = g.total[0, : g.prompt_length].tolist()
    pairs = [(t, s) for t, s, real in zip(tokens, scores, g.attention_mask[0].tolist()) if real]
    ranked = sorted(pairs, key=lambda p: p[1])
    return [p for p in reversed(ranked[-k:]) if p[1] > 0], [p for p in ranked[:k] if p[1] < 0]


def run(args: argparse.Namespace) -> int:
    """``backprop-hooks explain-answer``: the answer explained, its heat-map, page and numbers written to ``--out``."""
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    model, tokenizer = load(args.model)
    options = {"n_steps": args.n_steps} if args.method == "integrated_gradients" else {}
    g = bh.explain_generation(
        model,
        args.prompt,
        args.answer,
        foil_ids=args.foil,
        tokenizer=tokenizer,
        method=args.method,
        target=bh.targets.get(args.target),
        chat=args.chat,
        per_step=not args.no_steps,
        max_new_tokens=args.max_new_tokens,
        **options,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from backprop_hooks.eval.report import write_json, write_text
    from backprop_hooks.plotting.answers import answer_page
    from backprop_hooks.plotting.maps import save

    save(g.plot(), out / "answer.png")
    write_text(out / "answer.html", answer_page(g))
    write_json(out / "answer.json", g.to_dict())
    answer = "".join(g.tokens()[0][g.prompt_length :])
    p = float(g.probabilities[0].prod())
    line = f"answer {answer!r}: p = {p:.3g}"
    if g.foil_ids is not None:
        foil = "".join(g.tokens(foil=True)[0][g.prompt_length :])
        line += f"; foil {foil!r}: p = {float(g.foil_probabilities[0].prod()):.3g}"
    what = f"{g.target} of the answer" + (" minus the foil's" if g.foil_ids is not None else "")
    print(f"{line}; {what}: {float(g.potential[0]):+.4g} ({args.method})")
    pro, con = strongest(g)
    print("  for:     " + ", ".join(f"{t!r} {s:+.3g}" for t, s in pro))
    print("  against: " + ", ".join(f"{t!r} {s:+.3g}" for t, s in con))
    print(f"wrote {out / 'answer.png'}, {out / 'answer.html'}, {out / 'answer.json'}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    """Add the ``explain-answer`` subcommand to the command line's ``subparsers``."""
    p = subparsers.add_parser(
        "explain-answer",
        help="why a language model gave this answer (and not a foil answer)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, metavar="DIR", help="a Hugging Face causal LM folder (default: bundled)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt (default: a sentence of the help text)")
    p.add_argument("--answer", default=None, help="the answer to explain (default: the model's own greedy answer)")
    p.add_argument("--foil", default=None, help="another answer: explain log p(answer) - log p(foil)")
    p.add_argument("--method", default="attnlrp", choices=GENERATION_METHODS)
    p.add_argument("--target", default="log_softmax", help="per step: logit, log_softmax, weighted, max, ...")
    p.add_argument("--max-new-tokens", type=int, default=8, help="length of a generated answer")
    p.add_argument("--chat", action="store_true", help="put the prompt into the tokenizer's chat template")
    p.add_argument("--no-steps", action="store_true", help="the whole answer only (one backward pass)")
    p.add_argument("--n-steps", type=int, default=32, help="Integrated Gradients' steps")
    p.add_argument("--out", default="out/answer", help="folder for answer.png, answer.html, answer.json")
    p.set_defaults(func=run)
