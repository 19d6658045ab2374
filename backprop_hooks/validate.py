"""Input checks shared by every method: clear, typed errors before any work is done."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .errors import ClassIndexError, InputError, ModelOutputError

Classes = Union[None, int, Sequence[int], torch.Tensor]


def check_input(x: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """Check that ``x`` is a floating (B, ...) tensor with a batch dimension and finite values."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input must be a torch.Tensor of shape (B, C, H, W) or (B, F), got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(
            f"input must be a floating-point tensor (float32/float64/...), got dtype {x.dtype}; use x.float()"
        )
    if x.dim() < 2:
        raise InputError(f"input must have a batch dimension: shape (B, C, H, W) or (B, F), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("input has an empty batch (B = 0)")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise InputError("input contains NaN or Inf values; explanations need finite inputs")
    return x


def check_logits(logits: object, batch: int) -> torch.Tensor:
    """Check that the model returned a (B, C) tensor for a batch of ``batch`` inputs."""
    if not isinstance(logits, torch.Tensor):
        raise ModelOutputError(
            f"the model must return a (B, C) tensor of logits, got {type(logits).__name__}; "
            "wrap the model so that forward returns the logits"
        )
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ModelOutputError(
            f"the model must return logits of shape (B, C) = ({batch}, C), got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ModelOutputError(f"the model's logits must be floating point, got dtype {logits.dtype}")
    return logits


def check_classes(classes: Classes, logits: torch.Tensor, what: str = "class") -> torch.Tensor:
    """Resolve classes to a (B,) long tensor on the logits' device; ``None`` means the predicted class.

    Python ints and CPU tensors are range-checked without touching the device; a class tensor already on
    an accelerator costs one synchronisation for its range check.
    """
    batch, num_classes = logits.shape
    if classes is None:
        return logits.detach().argmax(dim=1)
    if isinstance(classes, bool):
        raise ClassIndexError(f"{what} index must be an int or a (B,) integer tensor, got a bool")
    if isinstance(classes, int):
        if not 0 <= classes < num_classes:
            raise ClassIndexError(
                f"{what} index {classes} is out of range; the model has {num_classes} classes (0..{num_classes - 1})"
            )
        return torch.full((batch,), classes, dtype=torch.long, device=logits.device)
    if not isinstance(classes, torch.Tensor):
        try:
            classes = torch.as_tensor(classes)
        except (TypeError, ValueError, RuntimeError):
            raise ClassIndexError(
                f"{what} indices must be an int, a sequence of ints or a (B,) tensor, got {type(classes).__name__}"
            ) from None
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise ClassIndexError(f"{what} indices must be integers, got dtype {classes.dtype}")
    if classes.dim() == 0:
        classes = classes.expand(batch)
    if classes.dim() != 1 or classes.shape[0] != batch:
        raise ClassIndexError(
            f"{what} indices must have shape ({batch},) to match the batch, got shape {tuple(classes.shape)}"
        )
    bad = (classes < 0) | (classes >= num_classes)
    if bool(bad.any()):
        first = classes[bad][0]
        raise ClassIndexError(
            f"{what} index {int(first)} is out of range; the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return classes.to(device=logits.device, dtype=torch.long)
