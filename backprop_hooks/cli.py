"""The command line: ``backprop-hooks SUBCOMMAND ...`` (same as ``python -m backprop_hooks``).

Each subcommand lives in the module that owns its work and exposes ``add_parser(subparsers)``, which adds
its parser and sets ``func`` (a function ``run(args) -> int``) as a default. Those modules import
torchvision, timm and matplotlib only inside the functions that need them, so ``--help`` and usage errors
cost little more than importing torch. Errors a user can fix (bad file,
unknown name, class out of range, weights that do not fit, no network) become one line on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import List, Optional

from .errors import BackpropHooksError

SUBCOMMANDS = {
    "explain": "backprop_hooks.eval.explain",
    "finetune": "backprop_hooks.models.finetune_command",
    "perturb": "backprop_hooks.eval.perturb",
    "mask": "backprop_hooks.eval.mask",
    "explain-text": "backprop_hooks.eval.explain_text",
    "explain-answer": "backprop_hooks.eval.explain_answer",
    "models": "backprop_hooks.eval.catalog",
    "faithfulness": "backprop_hooks.eval.faithfulness",
}


# What a user can fix: every backprop_hooks error (weights, data, usage included), bad values, files.
USER_ERRORS = (BackpropHooksError, ValueError, OSError)


# The library's words for what the command line calls otherwise (messages are written for API users).
API_WORDS = (
    ("pass layer=... explicitly", "give --layer NAME"),
    ("pass layer=...", "give --layer NAME"),
    ("layer=...", "--layer NAME"),
    ("pass weights=PATH (command line: --weights PATH)", "pass --weights PATH"),
    ("weights=PATH (--weights PATH)", "--weights PATH"),
)


def in_command_line_words(message: str, args: argparse.Namespace) -> str:
    """``message`` with the wrapper's class name replaced by the model's name and API keywords by options."""
    model = getattr(args, "model", None) or getattr(args, "arch", None)
    if isinstance(model, str):
        message = re.sub(r"\bNormalized\b", model, message)
    for api, words in API_WORDS:
        message = message.replace(api, words)
    return message


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line (subparsers inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="backprop-hooks", description="Class-contrastive back-propagation explanations.")
    parser.add_argument("--version", action="version", version=f"backprop-hooks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in SUBCOMMANDS.items():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as exc:  # a subcommand whose module is not written yet
            if exc.name != module:
                raise
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("backprop-hooks: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = in_command_line_words(message, args)
        print(f"backprop-hooks {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
