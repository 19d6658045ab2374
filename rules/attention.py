r"""Attention capture: each attention call's probabilities ``A = softmax(q kᵀ · scale)``, in the graph.

Fused kernels (``F.scaled_dot_product_attention``, timm's default; ``nn.MultiheadAttention`` called with
``need_weights=False``, torchvision's ViT) never materialise ``A``. :class:`AttentionCapture` builds the
explicit path

    A = softmax(q kᵀ · scale),   out = merge_heads(A v)

and returns the model's *own* value with the explicit path's gradient (a straight-through sum
``out_fused.detach() + (out − out.detach())``): the model's numbers are bit-for-bit unchanged, while
``A`` is part of the graph, so ``torch.autograd.grad(logits, capture.attentions, seed)`` yields every
layer's ``∂f/∂A`` in one backward pass, each paired with its own layer by tensor identity.

On timm's ``Attention`` the path uses the very ``q``, ``k``, ``v`` the fused forward computed (helper rules
tap ``qkv``, ``q_norm`` and ``k_norm``) and joins the model at ``norm``, before ``proj``: only the attention
core runs twice, no projection does. On ``nn.MultiheadAttention`` (no submodules to tap) the whole path,
projections included, is recomputed from the module's inputs and joins at its output.

As a module rule (``attach(model, {is_attention: capture})``) it supports timm's ``Attention`` (ViT, DeiT,
register-token ViTs; ``q_norm``/``k_norm``, ``norm`` and ``gate`` included) and ``nn.MultiheadAttention``
(no masks, no ``bias_k``/``add_zero_attn``).

Per function, independent of any library's classes: inside ``with capture.recording():`` every call of
``F.scaled_dot_product_attention`` (timm's fused path, Hugging Face's ``sdpa`` implementation, any model
that calls it) is captured with its own arguments, masks included (boolean or additive ``attn_mask``,
``is_causal``, ``scale``, grouped-query heads), and every softmax over the last axis of a 4-d tensor
(explicit attention: Hugging Face's ``eager`` implementation, timm with ``fused_attn=False``) is recorded
as it is. A ``TorchFunctionMode`` does it (thread-local, active only for the explained forward); nothing on
the model changes: no attribute, no ``config._attn_implementation``, no module. The explicit path starts
from the ``q``, ``k``, ``v`` the kernel received, so no projection runs twice, and the straight-through sum
keeps the output bit-identical; ``hold_attention`` acts on a gate between ``A`` and the scores. The rollout
methods use this, with ``nn.MultiheadAttention`` (whose functional core the mode cannot see) per module.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from backprop_hooks.rule import Rule
from backprop_hooks.errors import RuleError


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


def _core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``A = softmax(q kᵀ · scale)`` and ``merge_heads(A v)`` for (B, heads, N, head_dim) inputs: ``(merged, A)``."""
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    b, heads, n, _ = q.shape
    return (attn @ v).transpose(1, 2).reshape(b, n, heads * v.shape[-1]), attn


def _timm_explicit(m: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention``'s non-fused path (eval mode, no mask): ``(output, A)``."""
    b, n, _ = x.shape
    gate = m.gate(x).sigmoid() if getattr(m, "gate", None) is not None else None
    q, k, v = m.qkv(x).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out, attn = _core(m.q_norm(q), m.k_norm(k), v, m.scale)
    norm = getattr(m, "norm", None)
    out = norm(out) if norm is not None else out
    out = out * gate if gate is not None else out
    return m.proj(out), attn


def _mha_explicit(
    m: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``nn.MultiheadAttention``'s math without masks: ``(output, A)``; ``A`` is (B, heads, Lq, Lk)."""
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b = query.shape[0]
    heads, head_dim = m.num_heads, m.head_dim
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    b_q, b_k, b_v = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, t.shape[1], heads, head_dim).transpose(1, 2)

    q, k, v = split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k)), split(F.linear(value, w_v, b_v))
    merged, attn = _core(q, k, v, head_dim**-0.5)
    out = F.linear(merged, m.out_proj.weight, m.out_proj.bias)
    return (out if m.batch_first else out.transpose(0, 1)), attn


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
    builds the explicit path ``merge_heads(softmax(q kᵀ·scale) v)`` from the ``q``, ``k``, ``v`` the fused
    forward itself used (tapped), and returns ``norm``'s own output with that path's gradient. So only the
    attention core is computed twice; the projections run once, in the model."""

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
        path, attn = _core(q, k, v, m.scale)
        if not isinstance(module, nn.Identity):
            path = module.forward(path)  # not module(...): that would run this hook again
        self.owner.pending[m] = attn
        return _straight_through(output, path)


class AttentionCapture(Rule):
    """Records the attention probabilities of every call of the modules it sits on, in forward order, and,
    inside ``with capture.recording():``, of every attention function call (see the module docstring).

    ``attentions[i]``: (B, heads, N, N), part of the autograd graph; ``modules[i]``: the module of call i
    (``None`` for a function-level capture).
    The model's output values are unchanged (see the module docstring).

    ``hold_attention=True`` (the "AH-rule" of Ali et al. 2022, used for relevance passes): the gradient
    reaching the module's inputs flows through ``v`` only, with ``A`` held constant,
    ``∂̃out/∂x = W_vᵀ Aᵀ W_projᵀ``; ``∂f/∂A`` itself is unaffected. It is an attribute, so a method can
    switch it between two backward passes over the same graph.
    """

    linear = True

    def __init__(self, hold_attention: bool = False) -> None:
        self.hold_attention = hold_attention
        self.attentions: List[torch.Tensor] = []
        self.modules: List[nn.Module] = []
        self.pending: dict = {}  # attention module -> A of the call in progress (from _TimmPath)
        self._tap = _Tap()
        self.recording_active = False

    @contextlib.contextmanager
    def recording(self) -> Iterator["AttentionCapture"]:
        """Capture attention per function call for the duration of the block (see the module docstring):
        ``F.scaled_dot_product_attention`` and softmaxes over the last axis of 4-d tensors, appended to
        ``attentions`` in call order (``modules`` gets ``None`` for them)."""
        if self.recording_active:
            raise RuleError("AttentionCapture.recording() is already active")
        self.recording_active = True
        try:
            with _AttentionMode(self):
                yield self
        finally:
            self.recording_active = False

    def _record(self, attn: torch.Tensor, module: Optional[nn.Module] = None) -> None:
        self.attentions.append(attn)
        self.modules.append(module)

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
        if self.recording_active and not isinstance(module, nn.MultiheadAttention):
            return None  # captured per function call (scaled_dot_product_attention or the explicit softmax)
        if isinstance(module, nn.MultiheadAttention):
            if any(isinstance(a, torch.Tensor) for a in inputs[3:]):
                raise RuleError(
                    "AttentionCapture does not handle masked nn.MultiheadAttention calls (key_padding_mask/attn_mask)"
                )
            path, attn = _mha_explicit(module, *inputs[:3])
            replaced: Optional[Any] = (_straight_through(output[0], path), output[1])
        else:
            if len(inputs) > 1 and isinstance(inputs[1], torch.Tensor):
                raise RuleError("AttentionCapture does not handle masked attention calls (attn_mask)")
            attn = self.pending.pop(module, None)
            if attn is not None:  # the path is already in the graph (put there by _TimmPath on module.norm)
                replaced = None
            else:
                path, attn = _timm_explicit(module, inputs[0])
                replaced = _straight_through(output, path)
        self.attentions.append(attn)
        self.modules.append(module)
        self.ctx.attn = attn.detach()
        return replaced

    def backward(self, module: nn.Module, grad_input, grad_output):
        if not self.hold_attention or grad_output[0] is None:
            return None
        g_v = _value_path_grad(module, self.ctx.attn, grad_output[0])
        if isinstance(module, nn.MultiheadAttention):
            return (None, None, g_v) + tuple(grad_input[3:])
        return (g_v,) + tuple(grad_input[1:])


def _value_path_grad(m: nn.Module, attn: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
    """``W_vᵀ Aᵀ W_projᵀ g``: the gradient w.r.t. the value input with the attention ``A`` held constant."""
    mha = isinstance(m, nn.MultiheadAttention)
    if mha:
        w_proj = m.out_proj.weight
        w_v = m.in_proj_weight.chunk(3)[2] if m._qkv_same_embed_dim else m.v_proj_weight
        if not m.batch_first:
            g_out = g_out.transpose(0, 1)
    else:
        if getattr(m, "gate", None) is not None or not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
            raise RuleError("hold_attention supports timm Attention without gate and scale_norm")
        w_proj = m.proj.weight
        w_v = m.qkv.weight.chunk(3)[2]
    b, n, _ = g_out.shape
    heads = attn.shape[1]
    g = (g_out @ w_proj).view(b, n, heads, -1).transpose(1, 2)
    g = (attn.transpose(-2, -1) @ g).transpose(1, 2).reshape(b, n, -1) @ w_v
    return g.transpose(0, 1) if mha and not m.batch_first else g


# --------------------------------------------------------------------------------- per function call
class _Hold(torch.autograd.Function):
    """Identity on the attention probabilities; in the backward pass it lets the gradient through to the
    scores, or, while ``owner.hold_attention`` is set (AH-rule), stops it there: the gradient reaching the
    attention's inputs then flows through the values only. ``∂f/∂A`` itself is the same in both modes."""

    @staticmethod
    def forward(ctx, attn: torch.Tensor, owner: "AttentionCapture") -> torch.Tensor:
        ctx.owner = owner
        return attn.view_as(attn)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (torch.zeros_like(grad) if ctx.owner.hold_attention else grad), None


_SDPA = F.scaled_dot_product_attention
_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}


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
    """``F.scaled_dot_product_attention``'s math, written out: ``(A v, A)`` with
    ``A = softmax(q kᵀ · scale + mask)`` (B..., heads, Lq, Lk).

    Boolean masks (True: attend) and ``is_causal`` (top-left aligned, as SDPA's) exclude keys; a float mask
    is added to the scores. Excluded scores are ``finfo.min``, not ``−inf``, as in Hugging Face's eager
    attention: a query row with no key left gets uniform weights rather than NaN, and every gradient stays
    finite. ``enable_gqa``: key/value heads are repeated to the query heads. ``wrap``: applied to ``A``
    before it meets ``v`` (the capture's hold gate).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scores = (q * scale) @ k.transpose(-2, -1)
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
    attn = scores.softmax(dim=-1)
    if wrap is not None:
        attn = wrap(attn)
    return attn @ v, attn


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class _AttentionMode(TorchFunctionMode):
    """The function-level capture of :meth:`AttentionCapture.recording`."""

    def __init__(self, owner: AttentionCapture) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self._sdpa(args, kwargs)
        out = func(*args, **kwargs)
        if func in _SOFTMAXES and isinstance(out, torch.Tensor) and out.dim() == 4 and out.is_floating_point():
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim in (-1, 3):
                if not torch.is_grad_enabled():
                    self.owner._record(out)
                    return out
                held = _Hold.apply(out, self.owner)
                self.owner._record(held)
                return held
        return out

    def _sdpa(self, args: tuple, kwargs: dict) -> torch.Tensor:
        a = _sdpa_arguments(args, kwargs)
        if a.get("dropout_p", 0.0):
            raise RuleError(
                f"scaled_dot_product_attention was called with dropout_p={a['dropout_p']}: "
                "put the model in eval mode (model.eval()) to capture attention"
            )
        fused = _SDPA(*args, **kwargs)
        grad = torch.is_grad_enabled()
        path, attn = sdpa_explicit(
            a["query"],
            a["key"],
            a["value"],
            a.get("attn_mask"),
            bool(a.get("is_causal", False)),
            a.get("scale"),
            bool(a.get("enable_gqa", False)),
            wrap=(lambda t: _Hold.apply(t, self.owner)) if grad else None,
        )
        self.owner._record(attn)
        return _straight_through(fused, path) if grad else fused
