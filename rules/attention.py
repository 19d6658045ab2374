r"""Attention capture: each attention call's probabilities ``A = softmax(q kᵀ · scale)`` and, after a backward
pass, ``∂f/∂A``.

Fused kernels (``F.scaled_dot_product_attention``, timm's default; ``nn.MultiheadAttention`` called with
``need_weights=False``, torchvision's ViT) never materialise ``A``. With gradients on, the capture defers it:
the forward runs the model's own kernel only (its numbers, bit for bit), inside one autograd node per call
(:class:`~backprop_hooks.rules.attention_nodes.DeferredAttention`, ``DeferredMultihead``) whose backward
computes ``A`` once from the saved inputs, where the backward through attention needs it anyway:

    ∂f/∂A = g vᵀ,   ∂f/∂v = Aᵀ g,   ∂f/∂(q, k) through the softmax (unless held),

and hands ``(A, ∂f/∂A)`` over. :meth:`AttentionCapture.gradients` runs one ``torch.autograd.grad`` that
reaches every attention call (a zero-size probe per call) and returns the pairs in forward order, or what a
method reduces each pair to as it arrives, so that no layer's ``A`` is held from the forward to the backward.

Per function, independent of any library's classes: inside ``with capture.recording():`` every call of
``F.scaled_dot_product_attention`` (timm's fused path, Hugging Face's ``sdpa`` implementation, any model
that calls it) is captured with its own arguments, masks included (boolean or additive ``attn_mask``,
``is_causal``, ``scale``, grouped-query heads), and every softmax over the last axis of a 4-d tensor
(explicit attention: Hugging Face's ``eager`` implementation, timm with ``fused_attn=False``) is recorded
as it is (the model computes that ``A`` itself). An :class:`~backprop_hooks.rules.intercept.Intercept` does
it: only those calls reach the capture, in the thread that explains, for the explained forward only; nothing
on the model changes (no attribute, no ``config._attn_implementation``, no module).

As a module rule (``attach(model, {is_attention: capture})``) it supports timm's ``Attention`` (ViT, DeiT,
register-token ViTs; ``q_norm``/``k_norm``, ``norm`` and ``gate`` included: helper rules tap the ``q``,
``k``, ``v`` the fused forward computed, so no projection runs twice; ``A`` is computed in the forward and
the output carries the gradient of ``A v`` through ``AttentionValue``) and ``nn.MultiheadAttention`` (no
masks, no ``bias_k``/``add_zero_attn``; deferred: its projections are recomputed from its inputs in the
backward). The rollout methods use the function-level capture, with ``nn.MultiheadAttention`` (whose
functional core an interception cannot see) per module.

``hold_attention=True`` (the AH-rule) stops the gradient between ``A`` and the scores, on every path.
``differentiable=False``, or a forward without gradients: ``A`` is computed in the forward and recorded
outside the graph (what attention rollout reads).

The attention maths lives in :mod:`~backprop_hooks.rules.attention_maths`, the autograd nodes in
:mod:`~backprop_hooks.rules.attention_nodes`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import nn

from backprop_hooks.checkpointing import gradients, outside_checkpoint, reentrant_checkpoint_in, reentrant_error
from backprop_hooks.errors import RuleError
from backprop_hooks.rule import Rule

# the maths and the nodes stay importable from here (AttnLRP's rules and users import them by these names)
from .attention_maths import _SDPA, _SOFTMAXES, _merged_to_heads, _mha_explicit, _sdpa_arguments  # noqa: F401
from .attention_maths import _mha_probabilities, _straight_through, _timm_explicit, sdpa_explicit
from .attention_maths import sdpa_probabilities
from .attention_nodes import AttentionValue, DeferredAttention, DeferredMultihead, Handoff, Reduce, _Call  # noqa: F401
from .attention_nodes import _Hold, _Switch, attention_value, mha_parameters, probe_like
from .intercept import Intercept


def _timm_attention_class():
    """timm's ``Attention`` if timm is imported (a timm module cannot exist otherwise), else None: importing
    timm here would double the start-up time of everything that imports backprop_hooks."""
    layers = sys.modules.get("timm.layers")
    return getattr(layers, "Attention", None) if layers is not None else None


def is_timm_attention(module: nn.Module) -> bool:
    """timm's ``Attention`` with its own ``forward`` (subclasses that override it, e.g. RoPE, are not)."""
    _TimmAttention = _timm_attention_class()
    return (
        _TimmAttention is not None
        and isinstance(module, _TimmAttention)
        and type(module).forward is _TimmAttention.forward
    )


def is_attention(name: str, module: nn.Module) -> bool:
    """Selector for :func:`backprop_hooks.attach`: the attention modules :class:`AttentionCapture` handles."""
    return is_timm_attention(module) or isinstance(module, nn.MultiheadAttention)


class _Tap(Rule):
    """Keeps the last output of each module it sits on (timm Attention's ``qkv``, ``q_norm``, ``k_norm``)."""

    needs_backward = False

    def __init__(self) -> None:
        self.outputs: dict = {}

    def forward(self, module, inputs, output):
        self.outputs[module] = output


class _TimmPath(Rule):
    """On timm Attention's ``norm`` (an ``nn.Identity`` unless ``scale_norm``), inside the attention call:
    computes ``A`` from the ``q``, ``k``, ``v`` the fused forward itself used (tapped) and returns ``norm``'s
    output through :class:`AttentionValue` (the fused result with the gradient of ``A v``). No projection
    runs twice, and ``A v`` is never computed."""

    needs_backward = False

    def __init__(self, attention: nn.Module, tap: _Tap, owner: "AttentionCapture") -> None:
        self.attention, self.tap, self.owner = attention, tap, owner

    def forward(self, module, inputs, output):
        m, taps = self.attention, self.tap.outputs
        qkv, q, k = (taps.pop(part, None) for part in (m.qkv, m.q_norm, m.k_norm))
        if self.owner.recording_active:
            return None  # the function-level capture has this call's attention already
        if qkv is None or q is None or k is None or not isinstance(output, torch.Tensor):
            return None  # not the expected call sequence: AttentionCapture recomputes the whole path instead
        b, n, _ = qkv.shape
        v = qkv.reshape(b, n, 3, m.num_heads, m.head_dim)[:, :, 2].transpose(1, 2)
        if not self.owner.differentiable or not torch.is_grad_enabled():
            with torch.no_grad():
                self.owner.pending[m] = sdpa_probabilities(q, k, v, scale=m.scale)[0]
            return None
        with outside_checkpoint():
            attn = _Hold.apply(sdpa_probabilities(q, k, v, scale=m.scale)[0], self.owner._hold)
            self.owner.pending[m] = attn
            merged = attention_value(attn, v, inputs[0], _merged_to_heads(m.num_heads))
            if isinstance(module, nn.Identity):
                return merged
            return _straight_through(output, module.forward(merged))  # not module(...): that would run this hook again


# ------------------------------------------------------------------------------------------ the rule
class AttentionCapture(Rule):
    """Records every attention call of the modules it sits on and, inside ``with capture.recording():``, of
    every attention function call (see the module docstring), in forward order.

    ``shapes[i]``: the shape of call i's ``A`` (B..., heads, Lq, Lk); ``modules[i]``: its module (``None`` for
    a function-level capture); ``attentions[i]``: ``A`` if the forward computed it (explicit softmax
    attention, in the graph; timm's module path; ``differentiable=False`` or no gradients: outside the graph),
    ``None`` for a deferred call, whose ``A`` exists in the backward only: :meth:`gradients` returns it. The
    model's output values are unchanged.

    ``hold_attention=True`` (the "AH-rule" of Ali et al. 2022, used for relevance passes): the gradient
    reaching the attention's inputs flows through ``v`` only, with ``A`` held constant,
    ``∂̃out/∂x = W_vᵀ Aᵀ W_projᵀ``; ``∂f/∂A`` itself is unaffected. It is an attribute, so a method can
    switch it between two backward passes over the same graph.

    ``differentiable=False``: ``A`` is recorded outside the graph (no gradient path is built): for methods
    that only read the maps (attention rollout).
    """

    linear = True
    needs_backward = False  # the hold gate and the deferred nodes live in the graph: no module gradient hooks

    def __init__(self, hold_attention: bool = False, differentiable: bool = True) -> None:
        self._hold = _Switch(hold_attention)
        self._handoff = Handoff()
        self.differentiable = differentiable
        self.attentions: List[Optional[torch.Tensor]] = []
        self.modules: List[Optional[nn.Module]] = []
        self.shapes: List[torch.Size] = []
        self._probes: List[Optional[torch.Tensor]] = []  # deferred call i: its probe; else None
        self.pending: dict = {}  # attention module -> A of the call in progress (from _TimmPath)
        self._tap = _Tap()
        self._intercept: Optional[Intercept] = None

    @property
    def hold_attention(self) -> bool:
        return self._hold.on

    @hold_attention.setter
    def hold_attention(self, on: bool) -> None:
        self._hold.on = bool(on)

    @property
    def recording_active(self) -> bool:
        return self._intercept is not None

    @contextlib.contextmanager
    def recording(self) -> Iterator["AttentionCapture"]:
        """Capture attention per function call for the duration of the block (see the module docstring):
        ``F.scaled_dot_product_attention`` and softmaxes over the last axis of 4-d tensors, in call order
        (``modules`` gets ``None`` for them)."""
        if self.recording_active:
            raise RuleError("AttentionCapture.recording() is already active")
        handlers = {_SDPA: self._on_sdpa, **{softmax: self._on_softmax for softmax in _SOFTMAXES}}
        self._intercept = Intercept(handlers)
        try:
            with self._intercept:
                yield self
        finally:
            self._intercept = None

    @contextlib.contextmanager
    def _unrecorded(self) -> Iterator[None]:
        """The function-level capture ignores the calls of this block (a module path's own softmax)."""
        with self._intercept.paused() if self._intercept is not None else contextlib.nullcontext():
            yield

    def _record(self, attn: Optional[torch.Tensor], module: Optional[nn.Module] = None, shape=None, probe=None) -> None:
        self.attentions.append(attn)
        self.modules.append(module)
        self.shapes.append(attn.shape if attn is not None else torch.Size(shape))
        self._probes.append(probe)

    def _call(self, **sdpa_options) -> _Call:
        """The next call's index, options, switch and handoff, for a deferred node (never the capture itself)."""
        return _Call(len(self.shapes), switch=self._hold, handoff=self._handoff, **sdpa_options)

    def _building_graph(self) -> bool:
        return self.differentiable and torch.is_grad_enabled()

    # -- gradients ------------------------------------------------------------------------------------
    def gradients(
        self, logits: torch.Tensor, seed: torch.Tensor, retain_graph: bool = False, reduce: Optional[Reduce] = None
    ) -> List[Any]:
        """``[(A_l, ∂f/∂A_l)]`` of every recorded call, in forward order, from one backward pass of
        ``f = Σ seed · logits`` that runs exactly the part of the graph reaching the attention calls; with
        ``reduce``, ``[reduce(l, A_l, G_l)]``, each computed as its layer's pair arrives (deferred calls: in
        the backward pass), so that a method need not hold every layer's (B, heads, N, N) pair at once.
        ``A_l`` is detached; ``G_l`` is a tensor of its own (a reduction may modify it in place).
        ``retain_graph=True`` keeps the graph for another pass (deferred calls compute ``A`` again in it)."""
        if not self.shapes:
            return []
        if any(p is None and not a.requires_grad for a, p in zip(self.attentions, self._probes)):
            if reentrant_checkpoint_in(logits):  # the blocks ran without gradients in the forward pass
                raise reentrant_error()
            raise RuleError("the attention was recorded outside the autograd graph: it has no gradient")
        reduce = reduce if reduce is not None else (lambda i, a, g: (a, g))
        handoff = self._handoff
        handoff.reduce, handoff.results, handoff.keep = reduce, {}, retain_graph
        try:
            inputs = [p if p is not None else a for a, p in zip(self.attentions, self._probes)]
            grads = gradients(logits, inputs, seed, retain_graph=retain_graph)
            results = handoff.results
            for i, (a, p, g) in enumerate(zip(self.attentions, self._probes, grads)):
                if p is None:
                    results[i] = reduce(i, a.detach(), g)
            return [results[i] for i in range(len(inputs))]
        finally:
            handoff.reduce, handoff.results, handoff.keep = None, {}, False

    # -- function level -------------------------------------------------------------------------------
    def _on_softmax(self, func, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        if not (isinstance(out, torch.Tensor) and out.dim() == 4 and out.is_floating_point()):
            return out
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim not in (-1, 3):
            return out
        if not self._building_graph():
            self._record(out.detach() if not self.differentiable else out)
            return out
        held = _Hold.apply(out, self._hold)
        self._record(held)
        return held

    def _on_sdpa(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        a = _sdpa_arguments(args, kwargs)
        if a.get("dropout_p", 0.0):
            raise RuleError(
                f"scaled_dot_product_attention was called with dropout_p={a['dropout_p']}: "
                "put the model in eval mode (model.eval()) to capture attention"
            )
        q, k, v = a["query"], a["key"], a["value"]
        mask, causal = a.get("attn_mask"), bool(a.get("is_causal", False))
        scale, gqa = a.get("scale"), bool(a.get("enable_gqa", False))
        if not self._building_graph():
            fused = func(*args, **kwargs)
            with torch.no_grad():
                attn, _ = sdpa_probabilities(q, k, v, mask, causal, scale, gqa)
            self._record(attn)
            return fused
        if isinstance(mask, torch.Tensor) and mask.requires_grad:  # the mask's gradient: through A in the graph
            with outside_checkpoint():
                attn, v = sdpa_probabilities(q, k, v, mask, causal, scale, gqa)
            held = _Hold.apply(attn, self._hold)
            self._record(held)
            return attention_value(held, v, func(*args, **kwargs))
        call = self._call(is_causal=causal, scale=scale, enable_gqa=gqa)
        probe = probe_like(q)
        # the model's own call, in the graph, saves what it saves without the capture (what a checkpoint's
        # recomputation, which runs no rule, saves again); its node is dropped at once: the deferred node replaces it
        fused = func(*args, **kwargs)
        with outside_checkpoint():
            out = DeferredAttention.apply(probe, q, k, v, mask, call, fused.detach)
        shape = (*torch.broadcast_shapes(q.shape[:-3], k.shape[:-3]), q.shape[-3], q.shape[-2], k.shape[-2])
        self._record(None, shape=shape, probe=probe)
        return out

    # -- module level ---------------------------------------------------------------------------------
    def parts(self, module: nn.Module):
        """timm Attention: taps on ``qkv``, ``q_norm``, ``k_norm`` and the path on ``norm`` (see _TimmPath)."""
        if not is_timm_attention(module) or not isinstance(getattr(module, "norm", None), nn.Module):
            return ()
        return [
            (module.qkv, self._tap),
            (module.q_norm, self._tap),
            (module.k_norm, self._tap),
            (module.norm, _TimmPath(module, self._tap, self)),
        ]

    def check(self, module: nn.Module) -> None:
        if is_timm_attention(module):
            return
        if isinstance(module, nn.MultiheadAttention):
            if module.bias_k is not None or module.add_zero_attn:
                raise RuleError(
                    "AttentionCapture supports nn.MultiheadAttention without bias_k/bias_v and add_zero_attn"
                )
            return
        raise RuleError(
            f"AttentionCapture handles timm's Attention and nn.MultiheadAttention, not {type(module).__name__}; "
            "select attention modules with rules.attention.is_attention"
        )

    def forward(self, module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> Any:
        drops = [c for c in module.modules() if isinstance(c, nn.Dropout) and c.p > 0]
        if module.training and (drops or getattr(module, "dropout", 0.0)):
            raise RuleError(
                f"{type(module).__name__} has active dropout: "
                "put the model in eval mode (model.eval()) to capture attention"
            )
        if isinstance(module, nn.MultiheadAttention):
            return self._multihead(module, inputs, output)
        if self.recording_active:
            return None  # captured per function call (scaled_dot_product_attention or the explicit softmax)
        if len(inputs) > 1 and isinstance(inputs[1], torch.Tensor):
            raise RuleError("AttentionCapture does not handle masked attention calls (attn_mask)")
        attn = self.pending.pop(module, None)
        replaced = None
        if attn is None:  # not the expected call sequence: the whole explicit path, projections included
            wrap = (lambda t: _Hold.apply(t, self._hold)) if self._building_graph() else None
            with outside_checkpoint():
                path, attn = _timm_explicit(module, inputs[0], wrap)
            replaced = _straight_through(output, path) if self._building_graph() else None
            attn = attn if self._building_graph() else attn.detach()
        self._record(attn, module)
        return replaced

    def _multihead(self, module: nn.MultiheadAttention, inputs: Tuple[Any, ...], output: Any) -> Any:
        if any(isinstance(a, torch.Tensor) for a in inputs[3:]):
            raise RuleError(
                "AttentionCapture does not handle masked nn.MultiheadAttention calls (key_padding_mask/attn_mask)"
            )
        query, key, value = inputs[:3]
        if not self._building_graph():
            with self._unrecorded(), torch.no_grad():
                attn, _ = _mha_probabilities(module, query, key, value, with_values=False)
            self._record(attn, module)
            return None
        lq, lk = (query.shape[1], key.shape[1]) if module.batch_first else (query.shape[0], key.shape[0])
        batch = query.shape[0] if module.batch_first else query.shape[1]
        call, probe = self._call(is_causal=False, scale=None, enable_gqa=False), probe_like(output[0])
        detached = output[0].detach()  # the module's own graph is freed: the backward recomputes the explicit path
        with outside_checkpoint():
            out = DeferredMultihead.apply(
                probe, query, key, value, call, module, lambda: detached, *mha_parameters(module)
            )
        self._record(None, module, shape=(batch, module.num_heads, lq, lk), probe=probe)
        return (out,) + tuple(output[1:])


__all__ = [
    "AttentionCapture",
    "Handoff",
    "AttentionValue",
    "attention_value",
    "is_attention",
    "is_timm_attention",
    "sdpa_probabilities",
    "sdpa_explicit",
]
