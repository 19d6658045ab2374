r"""Attention capture: each attention call's probabilities ``A = softmax(q kᵀ · scale)``, in the graph.

Fused kernels (``F.scaled_dot_product_attention``, timm's default; ``nn.MultiheadAttention`` called with
``need_weights=False``, torchvision's ViT) never materialise ``A``. :class:`AttentionCapture` computes it
beside the kernel from the kernel's own ``q``, ``k``, ``v`` and returns the kernel's output through
:class:`AttentionValue`, an autograd node whose backward is that of ``A v``:

    out = fused(q, k, v)  (the model's own numbers, bit for bit),
    ∂f/∂A = g vᵀ,   ∂f/∂v = Aᵀ g    (g = ∂f/∂out),

so ``A v`` is never computed in the forward pass, and ``torch.autograd.grad(logits, capture.attentions, seed)``
yields every layer's ``∂f/∂A`` in one backward pass, each paired with its own layer by tensor identity. The
forward cost of the capture is ``q kᵀ`` and the softmax; its backward is the explicit attention's.

Per function, independent of any library's classes: inside ``with capture.recording():`` every call of
``F.scaled_dot_product_attention`` (timm's fused path, Hugging Face's ``sdpa`` implementation, any model
that calls it) is captured with its own arguments, masks included (boolean or additive ``attn_mask``,
``is_causal``, ``scale``, grouped-query heads), and every softmax over the last axis of a 4-d tensor
(explicit attention: Hugging Face's ``eager`` implementation, timm with ``fused_attn=False``) is recorded
as it is. An :class:`~backprop_hooks.rules.intercept.Intercept` does it: only those calls reach the
capture, in the thread that explains, for the explained forward only; nothing on the model changes (no
attribute, no ``config._attn_implementation``, no module).

As a module rule (``attach(model, {is_attention: capture})``) it supports timm's ``Attention`` (ViT, DeiT,
register-token ViTs; ``q_norm``/``k_norm``, ``norm`` and ``gate`` included: helper rules tap the ``q``,
``k``, ``v`` the fused forward computed, so no projection runs twice) and ``nn.MultiheadAttention`` (no
masks, no ``bias_k``/``add_zero_attn``; its projections are not reachable, so ``q``, ``k``, ``v`` are
recomputed from its inputs, and the backward of the output projection runs inside :class:`AttentionValue`).
The rollout methods use the function-level capture, with ``nn.MultiheadAttention`` (whose functional core an
interception cannot see) per module.

``hold_attention=True`` (the AH-rule) acts on a gate between ``A`` and the scores, on every path.
``differentiable=False`` records ``A`` only (no graph, no gradient path: what attention rollout reads).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from backprop_hooks.errors import RuleError
from backprop_hooks.rule import Rule

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


# ------------------------------------------------------------------------------------- autograd nodes
class AttentionValue(torch.autograd.Function):
    r"""``AttentionValue.apply(A, v, out, to_heads=None)``: the tensor ``out`` (a fused kernel's result for
    ``A v``, unchanged) with the backward of ``A v``: ``∂/∂A = h vᵀ``, ``∂/∂v = Aᵀ h``, ``h = to_heads(g)``
    the output gradient per head (B..., heads, Lq, Dv); ``to_heads=None``: ``out`` is per head already.
    ``A v`` is not computed. Shapes: ``A`` (B..., heads, Lq, Lk), ``v`` (B..., heads, Lk, Dv)."""

    @staticmethod
    def forward(ctx, attn: torch.Tensor, v: torch.Tensor, out: torch.Tensor, to_heads=None) -> torch.Tensor:
        ctx.save_for_backward(attn, v)
        ctx.to_heads = to_heads
        return out.detach()  # shares out's memory; a tensor of its own for autograd (in-place ops allowed)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        attn, v = ctx.saved_tensors
        h = g if ctx.to_heads is None else ctx.to_heads(g)
        g_attn = h @ v.transpose(-2, -1).to(h.dtype) if ctx.needs_input_grad[0] else None
        g_v = None
        if ctx.needs_input_grad[1]:
            g_v = attn.transpose(-2, -1).to(h.dtype) @ h
            g_v = g_v if g_v.shape == v.shape else g_v.sum_to_size(v.shape)
        return g_attn, g_v, None, None


def attention_value(
    attn: torch.Tensor, v: torch.Tensor, out: torch.Tensor, to_heads: Optional[Callable] = None
) -> torch.Tensor:
    """:class:`AttentionValue` on ``out`` detached: ``out``'s own graph (the fused kernel's) gets no gradient
    and is not kept alive by this one. A ``v`` that is a view into a larger tensor (timm's packed ``qkv``) is
    kept as a copy of its own: holding the view would hold the whole ``qkv`` until the backward pass."""
    if v.untyped_storage().nbytes() > v.numel() * v.element_size():
        v = v.clone(memory_format=torch.contiguous_format)
    return AttentionValue.apply(attn, v, out.detach(), to_heads)


class _Switch:
    """A flag shared by a capture and the hold gates of its graph (the gates never reference the capture
    itself: a capture holds its attention tensors, whose graph holds the gates, and a reference back would be
    a cycle through autograd's C++ nodes that Python's garbage collector cannot free)."""

    __slots__ = ("on",)

    def __init__(self, on: bool = False) -> None:
        self.on = on


class _Hold(torch.autograd.Function):
    """Identity on the attention probabilities; in the backward pass it lets the gradient through to the
    scores, or, while the capture's ``hold_attention`` is set (AH-rule), stops it there (no gradient reaches
    the scores, so nothing below them is computed): the gradient reaching the attention's inputs then flows
    through the values only. ``∂f/∂A`` itself is the same in both modes."""

    @staticmethod
    def forward(ctx, attn: torch.Tensor, switch: _Switch) -> torch.Tensor:
        ctx.switch = switch
        return attn.view_as(attn)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None if ctx.switch.on else grad), None


# ---------------------------------------------------------------------------------- attention maths
_SDPA = F.scaled_dot_product_attention
_SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)


def sdpa_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, v)`` of ``F.scaled_dot_product_attention``: ``A = softmax(q kᵀ · scale + mask)`` (B..., heads,
    Lq, Lk), and ``v`` with its heads repeated to the query heads (``enable_gqa``), so that ``out = A v``.

    Boolean masks (True: attend) and ``is_causal`` (top-left aligned, as SDPA's) exclude keys; a float mask
    is added to the scores. Excluded scores are ``finfo.min``, not ``−inf``, as in Hugging Face's eager
    attention: a query row with no key left gets uniform weights rather than NaN, and every gradient stays
    finite.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    batch, lq, lk = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2]
    q3 = q.expand(*batch, lq, q.shape[-1]).reshape(-1, lq, q.shape[-1])
    k3 = k.expand(*batch, lk, k.shape[-1]).reshape(-1, lk, k.shape[-1])
    scores = torch.baddbmm(q3.new_zeros(()), q3, k3.transpose(1, 2), beta=0.0, alpha=scale)  # scale in the GEMM
    scores = scores.view(*batch, lq, lk)
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        lq, lk = scores.shape[-2:]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, lowest)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, lowest)
        else:
            scores = (scores + attn_mask).clamp_min(lowest)
    return scores.softmax(dim=-1), v


def sdpa_explicit(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    wrap=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``F.scaled_dot_product_attention``'s math, written out: ``(A v, A)`` (see :func:`sdpa_probabilities`
    for ``A`` and the masks). ``wrap``: applied to ``A`` before it meets ``v`` (e.g. a hold gate)."""
    attn, v = sdpa_probabilities(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    if wrap is not None:
        attn = wrap(attn)
    return attn @ v, attn


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """``F.scaled_dot_product_attention``'s arguments by name."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _merged_to_heads(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, N, heads·D) -> (B, heads, N, D)."""
    return lambda g: g.unflatten(-1, (heads, -1)).transpose(1, 2)


# ------------------------------------------------------------------------------------ timm Attention
def _timm_explicit(m: nn.Module, x: torch.Tensor, wrap) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention``'s non-fused path (eval mode, no mask), ``wrap`` applied to ``A``: ``(output, A)``."""
    b, n, _ = x.shape
    gate = m.gate(x).sigmoid() if getattr(m, "gate", None) is not None else None
    q, k, v = m.qkv(x).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out, attn = sdpa_explicit(m.q_norm(q), m.k_norm(k), v, scale=m.scale, wrap=wrap)
    out = out.transpose(1, 2).reshape(b, n, -1)
    norm = getattr(m, "norm", None)
    out = norm(out) if norm is not None else out
    out = out * gate if gate is not None else out
    return m.proj(out), attn


def _straight_through(value: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """``value`` exactly, with the gradient of ``path``."""
    return value.detach() + (path - path.detach())


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
        attn = _Hold.apply(sdpa_probabilities(q, k, v, scale=m.scale)[0], self.owner._hold)
        self.owner.pending[m] = attn
        merged = attention_value(attn, v, inputs[0], _merged_to_heads(m.num_heads))
        if isinstance(module, nn.Identity):
            return merged
        return _straight_through(output, module.forward(merged))  # not module(...): that would run this hook again


# ---------------------------------------------------------------------------------- MultiheadAttention
def _mha_probabilities(
    m: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, with_values: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(A, v)`` of an unmasked ``nn.MultiheadAttention`` call, projections recomputed from its inputs
    (``v`` only ``with_values``); ``A`` is (B, heads, Lq, Lk), ``v`` (B, heads, Lk, head_dim)."""
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b, heads = query.shape[0], m.num_heads
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    b_q, b_k, b_v = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)

    if m._qkv_same_embed_dim and query is key and (value is query or not with_values):  # self-attention: one matmul
        parts = 3 if with_values else 2
        w = m.in_proj_weight[: parts * m.embed_dim]
        bias = None if m.in_proj_bias is None else m.in_proj_bias[: parts * m.embed_dim]
        qkv = F.linear(query, w, bias).unflatten(-1, (parts, heads, -1)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], (qkv[2] if with_values else None)
    else:
        q, k = split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k))
        v = split(F.linear(value, w_v, b_v)) if with_values else None
    attn = ((q * m.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn, v


def _mha_explicit(
    m: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``nn.MultiheadAttention``'s math without masks, every product written out: ``(output, A)``; ``A`` is
    (B, heads, Lq, Lk). (AttnLRP rules these products; the capture needs only ``A`` and ``v``.)"""
    attn, v = _mha_probabilities(m, query, key, value, with_values=True)
    b, heads, lq, _ = attn.shape
    merged = (attn @ v).transpose(1, 2).reshape(b, lq, heads * v.shape[-1])
    out = F.linear(merged, m.out_proj.weight, m.out_proj.bias)
    return (out if m.batch_first else out.transpose(0, 1)), attn


def _mha_output_to_heads(m: nn.MultiheadAttention) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gradient at ``nn.MultiheadAttention``'s output -> per head before its output projection."""
    weight, batch_first, heads = m.out_proj.weight.detach(), m.batch_first, m.num_heads

    def to_heads(g: torch.Tensor) -> torch.Tensor:
        g = g if batch_first else g.transpose(0, 1)
        return (g @ weight.to(g.dtype)).unflatten(-1, (heads, -1)).transpose(1, 2)

    return to_heads


# ------------------------------------------------------------------------------------------ the rule
class AttentionCapture(Rule):
    """Records the attention probabilities of every call of the modules it sits on, in forward order, and,
    inside ``with capture.recording():``, of every attention function call (see the module docstring).

    ``attentions[i]``: (B, heads, N, N), part of the autograd graph; ``modules[i]``: the module of call i
    (``None`` for a function-level capture). The model's output values are unchanged.

    ``hold_attention=True`` (the "AH-rule" of Ali et al. 2022, used for relevance passes): the gradient
    reaching the attention's inputs flows through ``v`` only, with ``A`` held constant,
    ``∂̃out/∂x = W_vᵀ Aᵀ W_projᵀ``; ``∂f/∂A`` itself is unaffected. It is an attribute, so a method can
    switch it between two backward passes over the same graph.

    ``differentiable=False``: ``A`` is recorded outside the graph (no gradient path is built): for methods
    that only read the maps (attention rollout).
    """

    linear = True
    needs_backward = False  # the hold gate and AttentionValue live in the graph: no module gradient hooks

    def __init__(self, hold_attention: bool = False, differentiable: bool = True) -> None:
        self._hold = _Switch(hold_attention)
        self.differentiable = differentiable
        self.attentions: List[torch.Tensor] = []
        self.modules: List[Optional[nn.Module]] = []
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
        ``F.scaled_dot_product_attention`` and softmaxes over the last axis of 4-d tensors, appended to
        ``attentions`` in call order (``modules`` gets ``None`` for them)."""
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

    def _record(self, attn: torch.Tensor, module: Optional[nn.Module] = None) -> None:
        self.attentions.append(attn)
        self.modules.append(module)

    def _building_graph(self) -> bool:
        return self.differentiable and torch.is_grad_enabled()

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
        fused = func(*args, **kwargs)
        mask, causal = a.get("attn_mask"), bool(a.get("is_causal", False))
        scale, gqa = a.get("scale"), bool(a.get("enable_gqa", False))
        if not self._building_graph():
            with torch.no_grad():
                attn, _ = sdpa_probabilities(a["query"], a["key"], a["value"], mask, causal, scale, gqa)
            self._record(attn)
            return fused
        attn, v = sdpa_probabilities(a["query"], a["key"], a["value"], mask, causal, scale, gqa)
        held = _Hold.apply(attn, self._hold)
        self._record(held)
        return attention_value(held, v, fused)

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
        graph = self._building_graph()
        with self._unrecorded(), contextlib.nullcontext() if graph else torch.no_grad():
            attn, v = _mha_probabilities(module, *inputs[:3], with_values=graph)
        if not graph:
            self._record(attn, module)
            return None
        attn = _Hold.apply(attn, self._hold)
        self._record(attn, module)
        return (attention_value(attn, v, output[0], _mha_output_to_heads(module)),) + tuple(output[1:])


__all__ = [
    "AttentionCapture",
    "AttentionValue",
    "attention_value",
    "is_attention",
    "is_timm_attention",
    "sdpa_probabilities",
    "sdpa_explicit",
]
