"""The `backprop-hooks finetune` subcommand: the recipe's fields as options, the data spec, one summary line
(the training itself is :func:`backprop_hooks.models.finetune.finetune`)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from . import data as data_sources
from .finetune import LR_SCHEDULES, OPTIMIZERS, FinetuneConfig, finetune
from .finetune import __doc__ as finetune_doc
from .zoo import available, spec


RECIPE_HELP = {
    "epochs": "training epochs",
    "lr": "learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "batch_size": "images per batch",
    "seed": "seed of initialisation, data order and augmentation",
    "lr_schedule": "learning-rate schedule",
    "warmup_epochs": "epochs of linear warm-up (cosine schedule)",
    "optimizer": "optimizer",
    "augment_shift": "random shifts of training images, in pixels",
    "num_workers": "data-loading worker processes",
}


def _add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--arch", required=True, choices=available(), help="architecture to train")
    parser.add_argument("--data", required=True, help=data_sources.DATA_SPEC_HELP)
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (last.pt, best.pt, class_names.json, metrics.csv)"
    )
    parser.add_argument("--device", default="cpu")
    recipe = parser.add_argument_group("recipe (defaults: the paper's)")
    choices = {"lr_schedule": LR_SCHEDULES, "optimizer": OPTIMIZERS}
    for f in fields(FinetuneConfig):
        if f.name in ("pretrained", "weights"):
            continue
        recipe.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            choices=choices.get(f.name),
            help=RECIPE_HELP.get(f.name, f.name.replace("_", " ")),
        )
    recipe.add_argument("--weights", type=Path, help="start from this local checkpoint instead of downloading")
    recipe.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        help="start from random init (default: the architecture's pretrained weights; the digits networks always "
        "train from scratch)",
    )
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing last.pt")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `finetune` subcommand to a parser's subparsers; its `func` default is `run`."""
    return _add_arguments(
        subparsers.add_parser(
            "finetune",
            help="fine-tune a model on CUB-200-2011, an image folder or the digits",
            description=finetune_doc.splitlines()[0],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
    )


def run(args: argparse.Namespace) -> int:
    """Run the `finetune` subcommand; prints one summary line and returns the exit code."""
    size = spec(args.arch).preprocessing().input_size[0]
    splits = data_sources.from_spec(args.data, size)
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    result = finetune(
        args.arch,
        splits.train,
        splits.val,
        config,
        out_dir=args.out,
        resume=args.resume,
        device=args.device,
        progress=args.progress,
        class_names=splits.class_names,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(
        f"{args.arch}: final val acc {result.final_acc:.4f}, best {result.best_acc:.4f}; "
        f"weights in {result.out_dir / 'best.pt'} and {result.out_dir / 'last.pt'}"
    )
    return 0
