"""`backprop-hooks explain-text [SENTENCE ...]`: why a text classifier chose its class and not the others.

The bundled classifier (``backprop_hooks.models.text_topics``, a 2-layer BERT trained here on the help
text that ships with CPython) sorts sentences into exceptions, strings, numbers and containers. Each
sentence is explained with ``--method`` and every ``--target`` (``versus:CLASS`` for "and not CLASS") in one
batched call per target; the token heat-maps are printed in colour (``--no-color`` for plain text) and, with
``--html FILE``, written to a self-contained HTML page. Sentences come first:

    backprop-hooks explain-text "Return a copy of the string." --target weighted versus:numbers --html out.html
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

import backprop_hooks as bh
from backprop_hooks.text import TEXT_METHODS

from backprop_hooks.plotting import tokens as render

DEFAULT_SENTENCES = (
    "The integer division of x by y is rounded toward minus infinity.",
    "Return a copy of the string with leading characters removed.",
)


def run(args: argparse.Namespace) -> int:
    """``backprop-hooks explain-text``: token heat-maps of the bundled text classifier, in the terminal and as HTML."""
    from backprop_hooks.models import text_topics

    model, tokenizer = text_topics.load()
    class_names = list(text_topics.CLASSES)
    from .arguments import check_targets, class_index  # classes and versus: by index or name, as in explain
    from .class_explanations import against_itself, zero_rows

    classes = None if args.cls is None else class_index(args.cls, class_names, "--class")
    keys = check_targets(args.target, len(class_names), class_names)
    sentences = args.sentences or list(DEFAULT_SENTENCES)
    ids, mask = tokenizer(sentences)
    toks = [tokenizer.tokens(s) for s in sentences]
    options = {"n_steps": args.n_steps} if args.method == "integrated_gradients" else {}
    all_rows = []
    if classes is None:  # the predicted classes, known before a versus: target meets its own class
        with torch.no_grad():
            classes = model(input_ids=ids, attention_mask=mask).logits.argmax(dim=1)
    classes = torch.as_tensor(classes).expand(ids.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)
        for key in keys:
            target = bh.targets.get(key)
            stand_in, itself = against_itself(target, classes)
            e = zero_rows(bh.explain_text(model, ids, mask, args.method, stand_in, classes, **options), itself, target)
            probs = e.probabilities
            for i, row in enumerate(render.rows(e, toks, class_names)):
                c = int(e.classes[i])
                versus = isinstance(target, bh.targets.Versus)
                why = f"and not {class_names[target.other]}" if versus else key
                if versus and target.other == c:
                    why += " (the class itself: zero by definition)"
                caption = f"{class_names[c]} (p={float(probs[i, c]):.2f}) · {why} · {args.method}"
                all_rows.append((row[0], row[1], caption))
                print(caption)
                print("  " + render.terminal(row[0], row[1], color=not args.no_color))
    if args.html:
        path = render.save_html(args.html, all_rows, title="Why this topic and not the others?")
        print(f"wrote {path}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    """Add the ``explain-text`` subcommand to the command line's ``subparsers``."""
    p = subparsers.add_parser(
        "explain-text",
        help="token heat-maps of the bundled text classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sentences", nargs="*", help="sentences to explain (default: two examples)")
    p.add_argument("--method", default="integrated_gradients", choices=TEXT_METHODS)
    p.add_argument(
        "--target", nargs="+", default=["logit", "weighted"], help="logit, weighted, mean, max, versus:CLASS, ..."
    )
    p.add_argument("--class", dest="cls", default=None, help="the class to explain (default: the predicted one)")
    p.add_argument("--n-steps", type=int, default=32, help="Integrated Gradients' steps")
    p.add_argument("--html", default=None, metavar="FILE", help="also write a self-contained HTML page")
    p.add_argument("--no-color", action="store_true", help="plain text: token(score)")
    p.set_defaults(func=run)
