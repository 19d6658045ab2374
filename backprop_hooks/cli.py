"""The command line: ``backprop-hooks SUBCOMMAND ...`` (same as ``python -m backprop_hooks``).

Each subcommand lives in the module that owns its work and exposes ``add_parser(subparsers)``, which adds
its parser and sets ``func`` (a function ``run(args) -> int``) as a default. Errors a user can fix (bad file,
unknown name, class out of range, weights that do not fit, no network) become one line on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .errors import BackpropHooksError

SUBCOMMANDS = {
    "explain": "backprop_hooks.eval.explain",
    "finetune": "backprop_hooks.models.finetune",
    "perturb": "backprop_hooks.eval.perturb",
    "mask": "backprop_hooks.eval.mask",
    "faithfulness": "backprop_hooks.eval.faithfulness",
}


# What a user can fix: every backprop_hooks error (weights, data, usage included), bad values, files.
USER_ERRORS = (BackpropHooksError, ValueError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line (subparsers inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="backprop-hooks", description="Class-contrastive back-propagation explanations.")
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
        print(f"backprop-hooks {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
