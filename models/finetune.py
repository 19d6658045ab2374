"""Fine-tuning (and training from scratch) with the paper's recipe, resumable to the exact same weights.

SGD (lr 1e-3, momentum 0.9, weight decay 5e-4), batch 128, 200 epochs, cross-entropy, seed 0 by default,
at a constant learning rate (the paper) or, with `lr_schedule="cosine"`, decayed per step to zero after
`warmup_epochs` of linear warm-up. `optimizer="adamw"` (betas 0.9, 0.999; `momentum` unused) is offered
for transformers trained from scratch.
torchvision/timm architectures start from their ImageNet weights with a fresh classifier for the data's
classes; the digits networks start from random init. Every epoch writes to `out_dir`:

- `last.pt`: {"model", "optimizer", "epoch", "best_acc", "rng", "config", "history"}, to resume from;
- `best.pt`: the network's state dict with the best validation accuracy so far (`models.create(arch,
  weights="best.pt")` loads it); `class_names.json`: the class names.

A run restarted with the same arguments continues from `last.pt` and, on CPU, ends with exactly the
weights of an uninterrupted run (model, optimizer and RNG states are restored; data order and
augmentation draw only from the saved generators). `epochs` may be raised when resuming
(with the constant schedule). On CUDA, atomics in cuDNN and pooling backward kernels make even two
uninterrupted runs differ unless `torch.use_deterministic_algorithms(True)` is set (with
CUBLAS_WORKSPACE_CONFIG=:4096:8); only then can resumed and uninterrupted runs agree bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from backprop_hooks.errors import OptionError, ResumeError
from backprop_hooks.files import atomic_write
from .normalized import Normalized
from .zoo import create, network_from_checkpoint, num_outputs, replace_head, spec, wrap

TensorPair = tuple[torch.Tensor, torch.Tensor]
DataSource = Union[Dataset, TensorPair]
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class FinetuneConfig:
    """The training recipe; the defaults are the paper's (SGD, lr 1e-3, momentum 0.9, weight decay 5e-4,
    batch 128, 200 epochs, constant learning rate, seed 0, from the architecture's pretrained weights)."""

    epochs: int = 200
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    lr_schedule: str = "constant"  # or "cosine" (per step, to zero), after warmup_epochs of linear warm-up
    warmup_epochs: int = 0
    optimizer: str = "sgd"  # or "adamw" (betas 0.9, 0.999)
    augment_shift: int = 0  # random shifts of training images by up to this many pixels
    pretrained: bool = True  # start from the architecture's pretrained weights (else random init)
    weights: Optional[str] = None  # start from this local checkpoint instead (its head replaced if needed)
    num_workers: int = 0  # DataLoader workers (does not change the result)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise OptionError(f"epochs must be >= 0 and batch_size >= 1, got {self.epochs} and {self.batch_size}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise OptionError(f"unknown lr_schedule {self.lr_schedule!r}; expected one of {LR_SCHEDULES}")
        if self.optimizer not in OPTIMIZERS:
            raise OptionError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.weights is not None:
            object.__setattr__(self, "weights", str(self.weights))

    def updated(self, **changes: Any) -> "FinetuneConfig":
        """A copy with ``changes`` (OptionError naming the accepted fields for an unknown one)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise OptionError(f"unknown finetune option(s) {unknown}; accepted: {[f.name for f in fields(self)]}")
        return replace(self, **changes)


@dataclass
class FinetuneResult:
    model: Normalized  # the final model, in eval mode
    best_acc: float
    final_acc: float
    out_dir: Path
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, loss, val_acc, seconds


def as_dataset(source: DataSource, what: str) -> Dataset:
    """A Dataset as it is, or a pair (images (N, C, H, W) float in [0, 1], labels (N,) int64) as a TensorDataset."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (tuple, list)) and len(source) == 2 and all(isinstance(t, torch.Tensor) for t in source):
        images, labels = source
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(
                f"{what} images must be a float (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(
                f"{what} labels must be an int64 ({images.shape[0]},) tensor, got {labels.dtype} {tuple(labels.shape)}"
            )
        return TensorDataset(images, labels)
    raise TypeError(f"{what} must be a Dataset or an (images, labels) tensor pair, got {type(source).__name__}")


def dataset_labels(dataset: Dataset) -> list[int]:
    """All labels of a TensorDataset, an ImageFolder (`targets`) or a `models.data.ImageListDataset` (`labels`)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    for attribute in ("targets", "labels"):
        if hasattr(dataset, attribute):
            return list(getattr(dataset, attribute))
    raise TypeError(f"cannot read the labels of a {type(dataset).__name__}; pass class_names=")


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by whole pixels, independently in x and y within [-max_shift, max_shift], zero-filled."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The learning-rate multiplier at optimisation step `step` of `total_steps` (linear warm-up first)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(name: str, parameters, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise OptionError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def accuracy(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy of `model` (switched to eval mode) over `loader`."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            predictions = model(images.to(device)).argmax(dim=1)
            correct += int((predictions.cpu() == labels).sum())
            total += len(labels)
    return correct / max(total, 1)


def _save(obj: object, path: Path) -> None:
    """torch.save through a temporary file, so an interruption never leaves a truncated checkpoint."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def _rng_state(generators: dict[str, torch.Generator], device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in generators.items()}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(
    state: dict[str, torch.Tensor], generators: dict[str, torch.Generator], device: torch.device
) -> None:
    torch.set_rng_state(state["torch"])
    for name, generator in generators.items():
        generator.set_state(state[name])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _train_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    augment_shift: int,
    generator: torch.Generator,
    device: torch.device,
    bar: tqdm,
) -> float:
    """One pass over `loader` (learning rate `lr_at(batch index)`); returns the mean training loss."""
    model.train()
    loss_sum, seen = 0.0, 0
    for batch, (images, labels) in enumerate(loader):
        for group in opt.param_groups:
            group["lr"] = lr_at(batch)
        images = random_shift(images, augment_shift, generator).to(device)
        loss = F.cross_entropy(model(images), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(labels)
        seen += len(labels)
        bar.update()
    return loss_sum / max(seen, 1)


def _start_line(arch: str, cfg: "FinetuneConfig", from_pretrained: bool, checkpoint, num_classes: int, last) -> str:
    """Where training starts from, in one line."""
    if checkpoint is not None:
        return f"resuming {arch} from {last} after epoch {checkpoint['epoch']} of {cfg.epochs}"
    if cfg.weights is not None:
        origin = f"the checkpoint {cfg.weights}"
    elif from_pretrained:
        origin = "its pretrained ImageNet weights (new classifier)"
    elif cfg.pretrained:
        origin = "random init (this architecture always trains from scratch)"
    else:
        origin = "random init (--no-pretrained)"
    return f"training {arch} for {num_classes} classes from {origin}, {cfg.epochs} epochs"


def _write_metrics(path: Path, history: list[dict]) -> None:
    """`metrics.csv`: one row per epoch, written through a temporary file."""
    lines = ["epoch,loss,val_acc,seconds"]
    lines += [f"{h['epoch']},{h['loss']:.6g},{h['val_acc']:.6g},{h['seconds']:.3f}" for h in history]
    atomic_write(path, lambda temporary: temporary.write_text("\n".join(lines) + "\n"))


def _resume_checkpoint(last_path: Path, config: dict) -> dict | None:
    """The checkpoint in `last_path`, if any; ResumeError if it was written with other settings."""
    if not last_path.is_file():
        return None
    checkpoint = torch.load(last_path, map_location="cpu", weights_only=True)
    if checkpoint["config"] != config:
        changed = sorted(k for k in config if checkpoint["config"].get(k) != config[k])
        raise ResumeError(
            f"{last_path} was written with different settings ({', '.join(changed)}); use another --out or --no-resume"
        )
    return checkpoint


def finetune(
    arch: str,
    train_data: DataSource,
    val_data: DataSource,
    config: Optional[FinetuneConfig] = None,
    *,
    out_dir: str | os.PathLike,
    resume: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    **changes: Any,
) -> FinetuneResult:
    """Train `arch` on `train_data` with cross-entropy, validating on `val_data` after every epoch.

    The recipe is `config` (default: :class:`FinetuneConfig`, the paper's), updated by keyword `changes`
    (`finetune(..., epochs=5, lr=0.05)`). Data: a Dataset of (pixel image in [0, 1], label) or an
    (images, labels) tensor pair. Classes: `class_names`, else the dataset's `classes` (ImageFolder), else
    0 .. largest training label. With `resume`, an existing `out_dir/last.pt` is continued (ResumeError if
    its settings differ). Seeds the global torch RNG with the recipe's `seed`. `log` receives one line
    saying where training starts from (pretrained weights, a checkpoint, random init, or a resumed run).
    Besides the checkpoints, `metrics.csv` gets one row per epoch (epoch, loss, val_acc, seconds).
    """
    cfg = (config or FinetuneConfig()).updated(**changes)
    arch_spec = spec(arch)
    train_set, val_set = as_dataset(train_data, "train_data"), as_dataset(val_data, "val_data")
    class_names = class_names if class_names is not None else getattr(train_set, "classes", None)
    num_classes = len(class_names) if class_names is not None else max(dataset_labels(train_set)) + 1
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from_pretrained = cfg.pretrained and not arch_spec.finetune_from_scratch
    saved = {  # the settings a resumed run must share (written into last.pt)
        "arch": arch,
        "num_classes": num_classes,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "pretrained": from_pretrained,
        "augment_shift": cfg.augment_shift,
        "train_size": len(train_set),
        "val_size": len(val_set),
        "lr_schedule": cfg.lr_schedule,
        "warmup_epochs": cfg.warmup_epochs,
        "optimizer": cfg.optimizer,
        "weights": cfg.weights,
    }
    if cfg.lr_schedule != "constant":  # the schedule depends on the total length
        saved["epochs"] = cfg.epochs
    last_path = out_dir / "last.pt"
    checkpoint = _resume_checkpoint(last_path, saved) if resume else None

    torch.manual_seed(cfg.seed)
    generators = {
        "loader": torch.Generator().manual_seed(cfg.seed),
        "augment": torch.Generator().manual_seed(cfg.seed + 1),
    }
    if cfg.weights is not None and checkpoint is None:
        network = network_from_checkpoint(arch_spec, cfg.weights, None)
        if num_outputs(network) != num_classes:
            network = replace_head(network, num_classes)
        model = wrap(network, arch_spec, class_names).to(device)
    else:
        model = create(
            arch, pretrained=from_pretrained and checkpoint is None, num_classes=num_classes, class_names=class_names
        ).to(device)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    start_epoch, best_acc, history = 0, -1.0, []
    if checkpoint is not None:
        model.model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        _set_rng_state(checkpoint["rng"], generators, device)
        start_epoch, best_acc, history = checkpoint["epoch"], checkpoint["best_acc"], list(checkpoint["history"])
    (out_dir / "class_names.json").write_text(json.dumps(model.class_names))
    if log is not None:
        log(_start_line(arch, cfg, from_pretrained, checkpoint, num_classes, last_path))

    train_loader = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, generator=generators["loader"], num_workers=cfg.num_workers
    )
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    steps = len(train_loader)
    bar = tqdm(
        total=cfg.epochs * steps,
        initial=start_epoch * steps,
        disable=not progress,
        desc=f"finetune {arch}",
        unit="batch",
    )
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        loss = _train_epoch(
            model,
            train_loader,
            opt,
            lambda batch: (
                cfg.lr
                * lr_factor(cfg.lr_schedule, epoch * steps + batch, cfg.epochs * steps, cfg.warmup_epochs * steps)
            ),
            cfg.augment_shift,
            generators["augment"],
            device,
            bar,
        )
        val_acc = accuracy(model, val_loader, device)
        history.append({"epoch": epoch + 1, "loss": loss, "val_acc": val_acc, "seconds": time.perf_counter() - started})
        bar.set_postfix(loss=f"{loss:.4f}", val_acc=f"{val_acc:.4f}")
        _write_metrics(out_dir / "metrics.csv", history)
        if val_acc > best_acc:
            best_acc = val_acc
            _save(model.model.state_dict(), out_dir / "best.pt")
        _save(
            {
                "model": model.model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch + 1,
                "best_acc": best_acc,
                "rng": _rng_state(generators, device),
                "config": saved,
                "history": history,
            },
            last_path,
        )
    bar.close()
    final_acc = history[-1]["val_acc"] if history else accuracy(model, val_loader, device)
    return FinetuneResult(model.eval(), best_acc, final_acc, out_dir, history)
