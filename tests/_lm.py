"""Language models at scale, for the tests: the text methods on small random-init GPT-2 and Llama models, with
checkpointing, offload, half precision or quantised weights, against the same model without them."""

import contextlib
import threading
import warnings

import pytest
import torch

import _hf
import backprop_hooks as bh
from backprop_hooks.text import TEXT_METHODS

LMS = ["gpt2", "llama"]
OPTIONS = {"smoothgrad": dict(n_samples=3, seed=0), "integrated_gradients": dict(n_steps=4)}
GRADIENT_FREE = ("rollout",)  # reads the attention maps only: no backward pass


def cases(fast, names=LMS, methods=TEXT_METHODS):
    """``(name, method)`` parameters; those not in ``fast`` (pairs, or ``(name, "*")``) are marked slow."""
    return [
        pytest.param(n, m, marks=() if (n, m) in fast or (n, "*") in fast else pytest.mark.slow)
        for n in names
        for m in methods
    ]


def build(name: str, seed: int = 0):
    """``_hf.build(name)`` with every dropout probability 0 (what training mode needs for checkpointing)."""
    model = _hf.build(name, seed=seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def inputs(name: str, batch: int = 2, length: int = 6):
    """Token ids and a padded attention mask (the second sample is one token shorter)."""
    return _hf.text_inputs(name, batch=batch, length=length)


def explain(model, ids, method: str, mask=None, target="weighted", **options) -> torch.Tensor:
    """``bh.explain_text`` on each row's next token (its default read-out for a causal LM); the attributions."""
    options = {**OPTIONS.get(method, {}), **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)  # a contrast on rollouts, norms
        e = bh.explain_text(model, ids, mask, method=method, target=target, **options)
    return e.attributions


def enable_checkpointing(model, reentrant: bool = False):
    """Hugging Face's gradient checkpointing (``torch.utils.checkpoint``), in training mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model.train()


def decoder_layers(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@contextlib.contextmanager
def threads_of(module):
    """The idents of the threads that start ``module``'s forward (the explained forward and recomputations; a
    pre-hook: a recomputation stops as soon as it has made the last tensor it needs, maybe inside the module)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(threading.get_ident()))
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def backward_in_another_thread():
    """Every ``torch.autograd.grad`` of the calling thread runs in a new thread, as CUDA runs the backward pass
    in its device threads (a checkpoint's recomputation with it)."""
    grad, caller = torch.autograd.grad, threading.get_ident()

    def in_thread(*args, **kwargs):
        if threading.get_ident() != caller:  # nested calls inside the backward pass
            return grad(*args, **kwargs)
        box = {}

        def work():
            try:
                box["out"] = grad(*args, **kwargs)
            except BaseException as exc:  # re-raised in the caller
                box["exc"] = exc

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        if "exc" in box:
            raise box["exc"]
        return box["out"]

    torch.autograd.grad = in_thread
    try:
        yield
    finally:
        torch.autograd.grad = grad


__all__ = ["LMS", "TEXT_METHODS", "OPTIONS", "GRADIENT_FREE", "build", "inputs", "explain"]
