"""What the experiments share: command-line options, model and data set-up, configuration, the run itself.

An experiment supplies ``process(x, labels, positions) -> per-sample results`` for one batch and a
``report(results)``; :func:`execute` runs it through :mod:`backprop_hooks.eval.runner` (batches, shards,
resumable chunks) and lets rank 0 write the report.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

import backprop_hooks as bh
from backprop_hooks import models
from backprop_hooks.errors import UsageError

from . import datasets, report, runner
from .arguments import check_device


@dataclass
class Setup:
    """A model on its device, the selected samples, this process's rank, and the run's configuration."""

    model: nn.Module
    samples: datasets.SampleSet
    positions: List[int]  # dataset indices of the selected samples, in run order
    device: torch.device
    processes: runner.Processes
    config: Dict[str, Any] = field(default_factory=dict)
    examples: int = 0  # samples in the figure of example maps (not part of the configuration)

    @property
    def class_names(self) -> List[str]:
        return list(self.samples.class_names or self.model.class_names)

    def sample_name(self, position: int) -> str:
        index = self.positions[position]
        names = self.samples.sample_names
        return names[index] if names else f"#{index}"

    def sample_row(self, results: Dict[str, torch.Tensor], s: int, **ints: str) -> Dict[str, Any]:
        """The start of sample ``s``'s row in samples.csv: who it is (position, dataset index, name, label),
        then ``ints`` (column -> results key) as integers."""
        pos = int(results["position"][s])
        row: Dict[str, Any] = {"position": pos, "index": int(results["index"][s]), "name": self.sample_name(pos)}
        row["label"] = int(results["label"][s])
        row.update({column: int(results[key][s]) for column, key in ints.items()})
        return row


def explain_batch(model: nn.Module, x: torch.Tensor, method: str, target: str, classes: torch.Tensor, **options):
    """``bh.explain`` for one batch of an experiment, without the non-linear-contrast warning (the report
    says which methods are linear)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)
        return bh.explain(model, x, method=method, target=target, classes=classes, **options)


def experiment_parser(
    subparsers: argparse._SubParsersAction, name: str, help: str, doc: str, default_model: str, default_data: str
) -> argparse.ArgumentParser:
    """The subcommand ``name`` (description: ``doc``'s first paragraph) with the options of every experiment."""
    parser = subparsers.add_parser(
        name, help=help, description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_arguments(parser, default_model, default_data)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser, default_model: str, default_data: str) -> None:
    """Options of every experiment: model, data, sample selection, batching, device, output, resume."""
    parser.add_argument("--model", default=default_model, help="architecture: " + ", ".join(models.available()))
    parser.add_argument("--weights", default=None, help="local checkpoint (state dict) instead of the default weights")
    parser.add_argument("--data", default=default_data, help=f"evaluation data: {datasets.SPEC_HELP}")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use N samples drawn at random with --seed (kept in data order); default: all",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --limit and of random methods")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch (= per resumable chunk)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--device", default="cpu", help="torch device (cuda = this rank's GPU under torchrun)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (chunks/ inside makes it resumable)")
    parser.add_argument("--fresh", action="store_true", help="discard the chunks of an earlier run in --out")
    parser.add_argument("--examples", type=int, default=4, help="samples in the figure of example maps")
    parser.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")


def select(n: int, limit: Optional[int], seed: int) -> List[int]:
    """All ``n`` indices, or ``limit`` of them drawn without replacement with ``seed``, in increasing order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    return sorted(chosen.tolist())


def method_options(method: str, model: nn.Module, layer: Optional[str]) -> Dict[str, Any]:
    """``layer=`` (given, else the model's ``default_layer``) for methods that take a layer; else nothing."""
    cls = bh.methods.get(method)
    if not cls.takes_layer:
        if layer is not None:
            raise UsageError(f"method {method!r} takes no --layer")
        return {}
    layer = layer or getattr(model, "default_layer", None)
    if layer is not None:
        bh.methods.get_module(model, layer)  # unknown layer names fail here, before the run
    return {"layer": layer} if layer is not None else {}


def prepare(args: argparse.Namespace, experiment: str, params: Dict[str, Any]) -> Setup:
    """Build the model and data, check they fit, select samples; the configuration hashes everything
    that changes the results (not the world size, the progress bar or the number of data workers)."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = runner.local_device(check_device(args.device))
    processes = runner.init_processes(device)
    model = models.create(args.model, weights=args.weights).to(device)
    size = int(tuple(model.input_size)[0])
    samples = datasets.from_spec(
        args.data,
        size,
        getattr(model, "crop_pct", datasets.IMAGENET_CROP_PCT),
        getattr(model, "interpolation", "bilinear"),
    )
    if samples.class_names is not None and len(samples.class_names) != len(model.class_names):
        raise UsageError(
            f"data {args.data!r} has {len(samples.class_names)} classes but model {args.model!r} has "
            f"{len(model.class_names)}; pass --weights of a model trained on these classes"
        )
    if len(samples) == 0:
        raise UsageError(f"data {args.data!r} holds no samples")
    positions = select(len(samples), args.limit, args.seed)
    config = {
        "experiment": experiment,
        "model": args.model,
        "weights": str(args.weights) if args.weights else "default",
        "weights_sha256": report.weights_sha256(model),
        "data": args.data,
        "labelled": samples.labelled,
        "num_samples": len(positions),
        "limit": args.limit,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": device.type,
        "input_size": size,
        "versions": report.versions(),
        **params,
    }
    return Setup(model, samples, positions, device, processes, config, examples=max(0, args.examples))


def execute(
    setup: Setup,
    args: argparse.Namespace,
    process: runner.Process,
    write_report: Callable[[Setup, runner.Results, Path], Optional[str]],
    desc: str,
) -> int:
    """Run ``process`` over the samples (resumable, sharded) and let rank 0 write the report into --out."""
    store = runner.ChunkStore(Path(args.out) / "chunks", setup.config)
    try:
        results = _run_chunks(setup, args, process, store, desc)
    except KeyboardInterrupt:
        if setup.processes.main and store.folder.is_dir():
            print(
                f"{desc}: interrupted; the finished batches are kept in {store.folder}/: rerun the same command to "
                "resume",
                file=sys.stderr,
            )
        raise
    code = 0
    if setup.processes.main:
        skipped = results.pop(runner.SKIPPED, torch.zeros(0, dtype=torch.long))
        if "position" not in results:
            raise UsageError(f"none of the {len(setup.positions)} samples of {args.data!r} could be read")
        results["index"] = torch.tensor(setup.positions, dtype=torch.long)[results["position"]]
        headline = write_report(setup, results, Path(args.out))
        if headline:
            print(headline + "\n")
        print(f"wrote {args.out}/results.md, results.csv, results.json, samples.csv and figures")
        if skipped.numel():
            print(
                f"backprop-hooks {desc}: error: {skipped.numel()} of {len(setup.positions)} samples could not be read "
                "and were left out (see above)",
                file=sys.stderr,
            )
            code = 2
    setup.processes.barrier()
    return code


def _run_chunks(setup: Setup, args: argparse.Namespace, process: runner.Process, store, desc: str):
    return runner.run_chunks(
        setup.samples.dataset,
        setup.positions,
        process,
        store,
        args.batch_size,
        setup.device,
        setup.processes,
        seed=args.seed,
        fresh=args.fresh,
        progress=args.progress,
        workers=args.workers,
        desc=desc,
    )


def target_of(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Logits at ``x`` and the explained class t: the label, or the prediction where there is none (-1)."""
    with torch.no_grad():
        logits = model(x)
    return logits, torch.where(labels >= 0, labels, logits.argmax(dim=1))
