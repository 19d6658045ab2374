"""Reproduce the shipped digits networks.

    python -m backprop_hooks.models.train_digits --arch digits_cnn|digits_vit|all


Trains with `models.finetune` on the digits training split (test split for validation only: the shipped
weights are those of the final epoch, not the best one) with 1 CPU thread, and writes the final state
dict to `models/weights/<arch>.pt` (or `--weights-dir`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import data
from .finetune import FinetuneResult, finetune
from .zoo import WEIGHTS_DIR

RECIPES: dict[str, dict] = {
    "digits_cnn": dict(
        epochs=20,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=64,
        lr_schedule="cosine",
        augment_shift=2,
        optimizer="sgd",
    ),
    "digits_vit": dict(
        epochs=60,
        lr=3e-3,
        weight_decay=0.05,
        batch_size=64,
        lr_schedule="cosine",
        warmup_epochs=5,
        augment_shift=2,
        optimizer="adamw",
    ),
}
THREADS = 1  # more threads on a shared, busy CPU can be many times slower (OpenMP spinning)


def train(
    arch: str, out_dir: str | Path, weights_path: str | Path | None = None, progress: bool = True, **overrides
) -> FinetuneResult:
    """Train `arch` with its recipe (updated by `overrides`) and save the final weights to `weights_path`."""
    torch.set_num_threads(THREADS)
    splits = data.digits(32)
    result = finetune(
        arch,
        splits.train,
        splits.val,
        seed=0,
        out_dir=out_dir,
        progress=progress,
        class_names=splits.class_names,
        **{**RECIPES[arch], **overrides},
    )
    torch.save(result.model.model.state_dict(), weights_path or WEIGHTS_DIR / f"{arch}.pt")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backprop_hooks.models.train_digits", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--arch", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="training folder (last.pt, best.pt)")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR, help="where <arch>.pt is written")
    args = parser.parse_args(argv)
    for arch in RECIPES if args.arch == "all" else [args.arch]:
        started = time.perf_counter()
        path = args.weights_dir / f"{arch}.pt"
        result = train(arch, args.out / arch, weights_path=path)
        print(
            f"{arch}: test accuracy {result.final_acc:.4f} after {len(result.history)} epochs, "
            f"{time.perf_counter() - started:.0f} s -> {path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
