r"""Explanations of models that use activation (gradient) checkpointing.

Hugging Face's ``model.gradient_checkpointing_enable()`` (``torch.utils.checkpoint``, non-reentrant by
default) keeps few activations in the forward pass and, in the backward pass, runs each checkpointed block
again to regenerate the tensors its backward needs. That recomputation is checked: it must save the tensors
the forward saved, in the same order and with the same shapes. Rules take part in checkpointing as follows:

* rules act on the explained forward pass only, never on a recomputation (:func:`recomputing`): the
  recomputation runs the model's own code, in whatever thread autograd runs it (CUDA runs the backward in its
  own device threads);
* the autograd nodes of rules keep the tensors they need outside the checkpoint (:func:`outside_checkpoint`),
  and a rule that replaces a model's call still makes that call itself, so the forward saves, inside a
  checkpointed block, exactly what the model's own code saves there: the recomputation matches;
* reentrant checkpointing (``use_reentrant=True``) runs the block without gradients in the forward pass and
  differentiates it inside its own backward, which refuses ``torch.autograd.grad``; :func:`gradients` turns
  that refusal into a :class:`~backprop_hooks.errors.ModelError` that names the fix.

The attributions are those of the model without checkpointing. Tensors that rules keep (the norms' held
factors, the captured attention's ``q``, ``k``, ``v``) are not recomputed, so they stay in memory from the
forward to the backward pass as they do without checkpointing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import torch

from .errors import ModelError

_REENTRANT_NODE = "CheckpointFunctionBackward"  # torch.utils.checkpoint's node with use_reentrant=True
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)

#: The fix a refusal of reentrant checkpointing names: non-reentrant checkpointing.
REENTRANT_FIX = (
    "enable checkpointing with model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    "{'use_reentrant': False}) (Hugging Face's default) or torch.utils.checkpoint.checkpoint(..., "
    "use_reentrant=False)"
)


def recomputing() -> bool:
    """True while a forward pass runs inside a backward pass (a non-reentrant checkpoint regenerating saved
    tensors), in any thread. A reentrant checkpoint's recomputation is not one: its graph is the one that is
    differentiated."""
    if torch._C._current_graph_task_id() == -1:
        return False
    node = torch._C._current_autograd_node()
    return type(node).__name__ != _REENTRANT_NODE


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def outside_checkpoint() -> Iterator[None]:
    """Tensors that autograd nodes save inside this block are kept as they are: an enclosing checkpoint neither
    drops nor recomputes them (nor counts them in its check of the recomputation). Nothing happens when no
    saved-tensor hooks are active (no checkpoint around)."""
    if _top_hooks is not None and _top_hooks(False) is None:
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        yield


def reentrant_checkpoint_in(outputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> bool:
    """Whether the autograd graph of ``outputs`` holds a reentrant checkpoint (walks the whole graph once)."""
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    stack = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == _REENTRANT_NODE:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def gradients(
    outputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    grad_outputs: Optional[Any] = None,
    **options: Any,
) -> Tuple[Optional[torch.Tensor], ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, **options)``; a model with reentrant checkpointing,
    which refuses it, raises :class:`~backprop_hooks.errors.ModelError` naming the fix."""
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs, **options)
    except RuntimeError as exc:
        if not reentrant_checkpoint_in(outputs):
            raise
        raise reentrant_error() from exc


def reentrant_error() -> ModelError:
    """The refusal of a model with reentrant checkpointing, naming the fix."""
    return ModelError(
        "the model runs reentrant activation checkpointing (use_reentrant=True), which differentiates in its "
        f"own backward pass and cannot give the gradient of the input alone (torch.autograd.grad); {REENTRANT_FIX}"
    )


__all__ = [
    "recomputing",
    "outside_checkpoint",
    "reentrant_checkpoint_in",
    "gradients",
    "reentrant_error",
    "REENTRANT_FIX",
]
