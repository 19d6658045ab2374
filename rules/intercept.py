r"""Function-level interception: calls of chosen torch functions handed to Python handlers, in one thread, for
the duration of a ``with`` block.

Attention in timm and Hugging Face runs as functions (``F.scaled_dot_product_attention``, softmax, matmul),
not modules, so module hooks cannot reach it. ``Intercept({function: handler})`` is a ``TorchFunctionMode``:
every torch function call of the thread that entered it reaches ``__torch_function__``, which looks the
function up in its table (one dictionary lookup) and runs every function without a handler unchanged. A
handler is called as ``handler(function, args, kwargs)`` and returns the call's result; the torch calls it
makes itself are not intercepted (the mode is off while a handler runs). Nothing on the model or on the
``torch`` namespace changes, and other threads see nothing.

Every function-level rule of the package is a table for it: :class:`~backprop_hooks.rules.attention.AttentionCapture`
(scaled-dot-product attention and the softmaxes of explicit attention), AttnLRP's
:class:`~backprop_hooks.rules.products.ProductRules` (products of input-dependent tensors, attention calls) and
the guided methods' count of functional ReLUs. A module rule that owns its module's backward makes the
innermost ``Intercept`` of its thread stand aside while the module runs (:func:`current`, :meth:`Intercept.pause`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

from torch.overrides import TorchFunctionMode

Handler = Callable[[Callable, tuple, dict], Any]
_CURRENT = threading.local()  # the innermost Intercept entered in this thread (modes are thread-local too)


class Intercept(TorchFunctionMode):
    """``with Intercept({F.softmax: handler, ...}):`` routes those calls to their handlers (see the module
    docstring). ``paused()``: a block whose calls run unchanged (e.g. a module hook's own computation)."""

    def __init__(self, handlers: Mapping[Callable, Handler]) -> None:
        super().__init__()
        self.handlers: Dict[Callable, Handler] = dict(handlers)
        self.depth = 0  # > 0: paused (nested pauses count)

    def __enter__(self) -> "Intercept":
        self._outer = getattr(_CURRENT, "intercept", None)
        _CURRENT.intercept = self
        return super().__enter__()

    def __exit__(self, *exc) -> Any:
        _CURRENT.intercept = self._outer
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            handler = self.handlers.get(func)
        except TypeError:  # an unhashable callable: never one of ours
            handler = None
        if handler is None or self.depth:
            return func(*args, **(kwargs or {}))
        return handler(func, args, kwargs or {})

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Calls made inside this block are not handed to the handlers."""
        self.pause(+1)
        try:
            yield
        finally:
            self.pause(-1)

    def pause(self, step: int) -> None:
        """``+1``: pause (e.g. when a module starts whose backward a module rule owns), ``-1``: resume."""
        self.depth = max(0, self.depth + step)


def current() -> Optional[Intercept]:
    """The innermost :class:`Intercept` active in this thread, or None."""
    return getattr(_CURRENT, "intercept", None)


__all__ = ["Intercept", "Handler", "current"]
