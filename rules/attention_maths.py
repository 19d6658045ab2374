r"""Attention written out: the probabilities ``A = softmax(q kᵀ · scale + mask)`` of
``F.scaled_dot_product_attention`` and of ``nn.MultiheadAttention``, and the explicit paths built from them.

Fused kernels never materialise ``A``; these functions compute it from the kernel's own inputs, with the
kernel's masks (boolean, additive, causal), ``scale`` and grouped-query heads. The attention capture and
AttnLRP's function-level rules share them.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_SDPA = F.scaled_dot_product_attention
_SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)


def repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query keys or values (..., kv_heads, L, D) repeated to ``heads`` query heads (each kv head
    serves ``heads / kv_heads`` consecutive query heads, as SDPA's ``enable_gqa``)."""
    return t if t.shape[-3] == heads else t.repeat_interleave(heads // t.shape[-3], dim=-3)


def fold_heads(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`repeat_heads` and of broadcasting: ``t`` summed to the shape of ``like``."""
    heads = like.shape[-3]
    if t.shape[-3] != heads:
        t = t.unflatten(-3, (heads, -1)).sum(-3)
    return t if t.shape == like.shape else t.sum_to_size(like.shape)


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
    if enable_gqa:
        k, v = repeat_heads(k, q.shape[-3]), repeat_heads(v, q.shape[-3])
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


def _straight_through(value: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """``value`` exactly, with the gradient of ``path``."""
    return value.detach() + (path - path.detach())


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


def _mha_values(m: nn.MultiheadAttention, value: torch.Tensor) -> torch.Tensor:
    """``v`` (B, heads, Lk, head_dim) of an ``nn.MultiheadAttention`` call: the value projection alone."""
    value = value if m.batch_first else value.transpose(0, 1)
    e = m.embed_dim
    w_v = m.in_proj_weight[2 * e :] if m._qkv_same_embed_dim else m.v_proj_weight
    b_v = None if m.in_proj_bias is None else m.in_proj_bias[2 * e :]
    return F.linear(value, w_v, b_v).unflatten(-1, (m.num_heads, -1)).transpose(1, 2)


def _mha_merge(m: nn.MultiheadAttention, heads_out: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, head_dim) per-head outputs -> the module's output (output projection, its layout)."""
    b, heads, lq, d = heads_out.shape
    out = F.linear(heads_out.transpose(1, 2).reshape(b, lq, heads * d), m.out_proj.weight, m.out_proj.bias)
    return out if m.batch_first else out.transpose(0, 1)


def _mha_explicit(
    m: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``nn.MultiheadAttention``'s math without masks, every product written out: ``(output, A)``; ``A`` is
    (B, heads, Lq, Lk). (AttnLRP rules these products; the capture needs only ``A`` and ``v``.)"""
    attn, v = _mha_probabilities(m, query, key, value, with_values=True)
    return _mha_merge(m, attn @ v), attn


def _mha_output_to_heads(m: nn.MultiheadAttention) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gradient at ``nn.MultiheadAttention``'s output -> per head before its output projection."""
    weight, batch_first, heads = m.out_proj.weight.detach(), m.batch_first, m.num_heads

    def to_heads(g: torch.Tensor) -> torch.Tensor:
        g = g if batch_first else g.transpose(0, 1)
        return (g @ weight.to(g.dtype)).unflatten(-1, (heads, -1)).transpose(1, 2)

    return to_heads
