r"""Function-level interception: calls of chosen torch functions handed to Python handlers, in one thread, for
the duration of a ``with`` block.

Attention in timm and Hugging Face runs as functions (``F.scaled_dot_product_attention``, softmax, matmul),
not modules, so module hooks cannot reach it. ``Intercept({function: handler})`` is a ``TorchFunctionMode``:
every torch function call of the thread that entered it reaches ``__torch_function__``, which looks the
function up in its table (one dictionary lookup) and runs every function without a handler unchanged. A
handler is called as ``handler(function, args, kwargs)`` and returns the call's result; the torch calls it
makes itself are not intercepted (the mode is off while a handler runs). Nothing on the model or on the
``torch`` namespace changes, and other threads see nothing.

Used by :class:`~backprop_hooks.rules.attention.AttentionCapture` (scaled-dot-product attention and the
softmaxes of explicit attention); a rule that needs other functions (``matmul``, ``mul``, normalisations)
builds its own table and enters its own ``Intercept``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Mapping

from torch.overrides import TorchFunctionMode

Handler = Callable[[Callable, tuple, dict], Any]


class Intercept(TorchFunctionMode):
    """``with Intercept({F.softmax: handler, ...}):`` routes those calls to their handlers (see the module
    docstring). ``paused()``: a block whose calls run unchanged (e.g. a module hook's own computation)."""

    def __init__(self, handlers: Mapping[Callable, Handler]) -> None:
        super().__init__()
        self.handlers: Dict[Callable, Handler] = dict(handlers)
        self._paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            handler = self.handlers.get(func)
        except TypeError:  # an unhashable callable: never one of ours
            handler = None
        if handler is None or self._paused:
            return func(*args, **(kwargs or {}))
        return handler(func, args, kwargs or {})

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Calls made inside this block are not handed to the handlers."""
        paused, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = paused


__all__ = ["Intercept", "Handler"]
