"""Input checks shared by every method: clear, typed errors before any work is done."""

from __future__ import annotations

import re
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import torch

from torch import nn

from .errors import (
    BackpropHooksError,
    ClassIndexError,
    InputError,
    ModelError,
    ModelOutputError,
    NonFiniteLogitsError,
    OptionError,
)

Classes = Union[None, int, Sequence[int], torch.Tensor]
LogitsFn = Callable[[Any], torch.Tensor]
_RANDOM = re.compile("drop|jitter|noise")  # float attributes that randomise a forward pass in training mode


def check_model(model: object, what: str = "model must be") -> nn.Module:
    """``model`` itself if it is an ``nn.Module``, else a :class:`ModelError`."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"{what} an nn.Module, got {type(model).__name__}")
    return model


def check_input(x: torch.Tensor, check_finite: bool = True, embeds_tokens: bool = False) -> torch.Tensor:
    """Check that ``x`` is a floating (B, ...) tensor with a batch dimension and finite values. ``embeds_tokens``:
    the model embeds token ids (``get_input_embeddings()``), so integer (B, L) input is pointed to explain_text."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input must be a torch.Tensor of shape (B, C, H, W) or (B, F), got {type(x).__name__}")
    if not x.is_floating_point():
        integer = not x.is_complex() and x.dtype != torch.bool
        if integer and x.dim() == 2:
            text = "bh.explain_text(model, input_ids, attention_mask, method, target)"
            if embeds_tokens:
                raise InputError(
                    f"input is an integer (B, L) tensor (dtype {x.dtype}), token ids: explain them with {text}"
                )
            raise InputError(
                f"input must be a floating-point tensor (float32/float64/...), got dtype {x.dtype}; use x.float(), "
                f"or, for the token ids of a text model, {text}"
            )
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


def check_logits(logits: object, batch: int, source: str = "the model") -> torch.Tensor:
    """Check that ``logits`` is a floating (B, C) tensor for a batch of ``batch`` inputs."""
    if not isinstance(logits, torch.Tensor):
        raise ModelOutputError(
            f"{source} must return a (B, C) tensor of logits, got {type(logits).__name__}; "
            "pass logits=fn (output -> (B, C) logits) to select them, e.g. logits=lambda out: out[0]"
        )
    if logits.dim() == 3 and logits.shape[0] == batch:
        raise ModelOutputError(
            f"{source} must return logits of shape (B, C) = ({batch}, C), got shape {tuple(logits.shape)}: "
            "per-position logits (B, L, V), as a language model's? Pick one position per sample: bh.explain_text "
            "reads a causal LM's next token after each row's last real token by default; or pass logits=fn, e.g. "
            "logits=lambda out: out.logits[:, i]"
        )
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ModelOutputError(
            f"{source} must return logits of shape (B, C) = ({batch}, C), got shape {tuple(logits.shape)}"
            + ("" if source != "the model" else "; pass logits=fn (output -> (B, C) logits) to select them")
        )
    if not logits.is_floating_point():
        raise ModelOutputError(f"the logits must be floating point, got dtype {logits.dtype}")
    return logits


def check_finite_logits(logits: torch.Tensor, samples: Optional[int] = None, where: str = "") -> torch.Tensor:
    """``logits`` when every value is finite (one host synchronisation), else a :class:`NonFiniteLogitsError` naming
    the samples and how many classes are NaN or Inf. ``samples``: the logits stack points of that many samples
    (row ``r`` belongs to sample ``r mod samples``); ``where``: where the points are, for the message."""
    if bool(torch.isfinite(logits).all()):
        return logits
    bad = (~torch.isfinite(logits.detach())).sum(dim=1)
    rows = bad.nonzero().flatten()
    names = sorted(set((rows % samples if samples else rows).tolist()))
    counts = sorted(set(bad[rows].tolist()), reverse=True)
    count = str(counts[0]) if len(counts) == 1 else f"{counts[-1]} to {counts[0]}"
    shown = str(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    raise NonFiniteLogitsError(
        f"the model's logits are NaN or Inf{where} in samples {shown} ({count} of {logits.shape[1]} classes): "
        "check the model's weights and the input's dtype (float16 overflows past 65504)"
    )


def check_logits_fn(logits: Optional[LogitsFn]) -> Optional[LogitsFn]:
    """``logits=`` is ``None`` or a callable (the model's output -> (B, C) logits)."""
    if logits is not None and not callable(logits):
        raise OptionError(
            f"logits= must be a function (the model's output -> (B, C) logits), got {type(logits).__name__}"
        )
    return logits


def select_logits(output: Any, batch: int, logits: Optional[LogitsFn] = None) -> torch.Tensor:
    """The (B, C) logits in a model's output: ``logits(output)`` when a function is given; else the output
    itself when it is a tensor, its tensor ``.logits`` attribute (Hugging Face ``ModelOutput``) or its
    ``"logits"`` key (a dict)."""
    if logits is not None:
        try:
            selected = logits(output)
        except BackpropHooksError:
            raise
        except Exception as exc:
            raise ModelOutputError(
                f"the logits= function failed on the model's output ({type(output).__name__}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return check_logits(selected, batch, source="the logits= function")
    if isinstance(output, torch.Tensor):
        return check_logits(output, batch)
    try:
        found = getattr(output, "logits", None)
    except Exception:  # a property that fails is no logits
        found = None
    if not isinstance(found, torch.Tensor) and isinstance(output, Mapping):
        found = output.get("logits")
    if isinstance(found, torch.Tensor):
        return check_logits(found, batch, source="the model's output .logits")
    return check_logits(output, batch)


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


def training_effects(model: nn.Module) -> List[str]:
    """What training mode changes in ``model``'s forward pass, one entry per module: active dropout (dropout
    modules with ``p > 0``; positive float attributes named ``*drop*``, ``*jitter*`` or ``*noise*``: an
    attention's ``attention_dropout``, stochastic depth, layer drop, a router's jitter noise) and norms that use
    batch statistics. Empty: training mode computes what
    eval mode computes (e.g. a model in training mode for gradient checkpointing, with every dropout at 0)."""
    found: List[str] = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        where = name or type(module).__name__
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if module.p > 0:
                found.append(f"{where} (p={module.p})")
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats
        ):
            found.append(f"{where} (batch statistics)")
        else:
            drops = [f"{k}={v}" for k, v in vars(module).items() if type(v) is float and v > 0 and _RANDOM.search(k)]
            if drops:
                found.append(f"{where} ({', '.join(drops)})")
    return found
