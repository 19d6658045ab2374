r"""Autograd nodes of the attention capture.

* :class:`DeferredAttention` (``F.scaled_dot_product_attention``) and :class:`DeferredMultihead`
  (``nn.MultiheadAttention``): the forward runs the model's own computation only; the backward computes the
  attention probabilities ``A`` once, from the saved inputs, where they are needed anyway:

      ∂f/∂A = g vᵀ,   ∂f/∂v = Aᵀ g,   ∂f/∂(q, k) through the softmax (unless the attention is held),

  and hands ``(A, ∂f/∂A)`` to the capture through a :class:`Handoff` (paired by the call's index in forward
  order). A per-call *probe* (a zero-size leaf, an input of the node) lets one ``torch.autograd.grad`` run
  exactly the part of the graph that reaches every attention call.
* :class:`AttentionValue`: a fused kernel's output with the backward of ``A v`` for an ``A`` computed in the
  forward (timm's module-level capture, masks that require a gradient).
* :class:`_Hold`: the AH-rule's gate between ``A`` and the scores, switched by a :class:`_Switch`.

No node references the capture: a capture holds graph tensors (probes, attention maps), and a reference back
from the graph would be a cycle through autograd's C++ nodes that Python's garbage collector cannot free. The
nodes reference a :class:`_Switch` and a :class:`Handoff` only, which reference nothing of the graph.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from backprop_hooks.checkpointing import outside_checkpoint

from .attention_maths import _mha_output_to_heads, _mha_probabilities, _mha_values, fold_heads, repeat_heads
from .attention_maths import sdpa_probabilities

Reduce = Callable[[int, torch.Tensor, torch.Tensor], Any]


class _Switch:
    """A flag shared by a capture and the hold gates of its graph (see the module docstring for why the gates
    never reference the capture itself)."""

    __slots__ = ("on",)

    def __init__(self, on: bool = False) -> None:
        self.on = on


class Handoff:
    """Where deferred attention nodes deliver ``(A_l, ∂f/∂A_l)`` during a backward pass that asked for them
    (``reduce`` set by :meth:`AttentionCapture.gradients`): ``results[l] = reduce(l, A_l, G_l)``. Outside such
    a pass (``reduce is None``) nothing is kept. ``keep``: the pass retains the graph for another one."""

    __slots__ = ("reduce", "results", "keep")

    def __init__(self) -> None:
        self.reduce: Optional[Reduce] = None
        self.results: Dict[int, Any] = {}
        self.keep = False

    def deliver(self, index: int, attn: torch.Tensor, grad: torch.Tensor) -> None:
        if self.reduce is not None:
            self.results[index] = self.reduce(index, attn, grad)


class _Call:
    """What a deferred node needs besides its tensors: its index, SDPA's options, the hold switch, the handoff."""

    __slots__ = ("index", "is_causal", "scale", "enable_gqa", "switch", "handoff")

    def __init__(self, index: int, is_causal: bool, scale, enable_gqa: bool, switch: _Switch, handoff: Handoff):
        self.index, self.is_causal, self.scale, self.enable_gqa = index, is_causal, scale, enable_gqa
        self.switch, self.handoff = switch, handoff


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
    with outside_checkpoint():
        return AttentionValue.apply(attn, v, out.detach(), to_heads)


def _wanted(ctx) -> Tuple[bool, ...]:
    """``ctx.needs_input_grad`` narrowed to the gradients this backward pass will use: autograd runs only the
    part of the graph that reaches the inputs asked for, and a custom node must skip the rest itself (e.g. the
    first layer's ``q``, ``k``, ``v`` and the parameters when only the probes are asked for). The engine
    answers per next node (``torch.autograd.grad`` answers a leaf only by refusing when it is one of the
    inputs, i.e. wanted). The probe (input 0) is always answered."""
    will = getattr(torch._C, "_will_engine_execute_node", None)
    needs = ctx.needs_input_grad
    nodes = iter(node for node, _ in ctx.next_functions)  # one per tensor input, in order
    out = [needs[0]]
    next(nodes)
    for need, arg in zip(needs[1:], ctx.tensor_inputs[1:]):
        node = next(nodes) if arg else None
        if need and node is not None and will is not None:
            try:
                need = will(node)
            except RuntimeError:  # a leaf that is an input of torch.autograd.grad
                need = True
        out.append(bool(need) and node is not None)
    return tuple(out)


def probe_like(t: torch.Tensor) -> torch.Tensor:
    """A zero-size leaf that requires a gradient: a deferred node's handle for ``torch.autograd.grad``."""
    return t.new_zeros(0).requires_grad_(True)


class DeferredAttention(torch.autograd.Function):
    r"""``DeferredAttention.apply(probe, q, k, v, attn_mask, call, kernel)``: ``kernel()`` (the model's own
    ``F.scaled_dot_product_attention`` call, bit for bit), with SDPA's gradient computed in the backward from
    ``A = softmax(q kᵀ · scale + mask)`` (:func:`sdpa_probabilities`, masks, causal, ``scale``, GQA):
    ``∂f/∂v = Aᵀ g`` (summed over repeated heads), ``∂f/∂(q, k)`` through ``A`` with ``∂f/∂A = g vᵀ`` unless
    the attention is held; ``(A, ∂f/∂A)`` goes to ``call.handoff``. ``A`` is computed once per backward pass
    and not kept on the node: a second pass over a retained graph computes it again (transformer_attribution
    on timm's ViT-Tiny, b8: 1.59x fwd+bwd and 1.23x its memory; holding every layer's ``A`` between the two
    passes: 1.52x and 1.41x)."""

    @staticmethod
    def forward(ctx, probe, q, k, v, attn_mask, call: _Call, kernel: Callable[[], torch.Tensor]):
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.call, ctx.tensor_inputs = call, (True, True, True, True, attn_mask is not None)
        return kernel()

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        q, k, v, mask = ctx.saved_tensors
        c: _Call = ctx.call
        need_probe, need_q, need_k, need_v = _wanted(ctx)[:4]
        through_scores = (need_q or need_k) and not c.switch.on
        with torch.enable_grad() if through_scores else torch.no_grad():
            qq = q.detach().requires_grad_(need_q and through_scores)
            kk = k.detach().requires_grad_(need_k and through_scores)
            probs, _ = sdpa_probabilities(qq, kk, v, mask, c.is_causal, c.scale, c.enable_gqa)
        attn = probs.detach()
        delivering = c.handoff.reduce is not None  # a plain backward of the user's own: no ∂f/∂A unless used
        grad_attn = None
        if through_scores or delivering:
            v_heads = repeat_heads(v, q.shape[-3]) if c.enable_gqa else v
            grad_attn = g @ v_heads.transpose(-2, -1).to(g.dtype)
        dq = dk = None
        if through_scores:
            wanted = [t for t, need in ((qq, need_q), (kk, need_k)) if need]
            grads = iter(torch.autograd.grad(probs, wanted, grad_attn))
            dq, dk = (next(grads) if need_q else None), (next(grads) if need_k else None)
        del probs
        dv = fold_heads(attn.transpose(-2, -1).to(g.dtype) @ g, v) if need_v else None
        if delivering:
            c.handoff.deliver(c.index, attn, grad_attn)
        return (q.new_zeros(0) if need_probe else None), dq, dk, dv, None, None, None


def mha_parameters(m: nn.MultiheadAttention) -> list:
    """The parameters of ``nn.MultiheadAttention``'s computation, in a fixed order (absent ones left out)."""
    named = (m.in_proj_weight, m.in_proj_bias, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
    return [p for p in named + (m.out_proj.weight, m.out_proj.bias) if p is not None]


class DeferredMultihead(torch.autograd.Function):
    r"""``DeferredMultihead.apply(probe, query, key, value, call, module, output, *mha_parameters(module))``:
    ``output()`` (the module's own output, detached: its graph is not kept), with the gradient of the module's
    explicit path recomputed in the backward from the saved inputs, like activation checkpointing of this one
    block: projections, ``A``, ``A v``, the output projection, then ``∂f/∂A = h vᵀ`` (``h`` the output gradient
    per head), handed to ``call.handoff`` with ``A``, and the gradients of the inputs and parameters, through
    the scores unless the attention is held (AH-rule: ``∂̃out/∂value = W_vᵀ Aᵀ W_oᵀ g``). ``A v`` and the
    output projection run only when the output projection's parameters are asked for.

    While the handoff keeps the graph, ``A`` stays on the node for a held pass over it, which then recomputes
    the value projection alone (transformer_attribution on torchvision's ViT-Tiny, b8: 1.58x fwd+bwd and
    1.17x its memory with it, 1.77x and 1.00x without; :class:`DeferredAttention`, whose recomputation is
    ``q kᵀ`` and a softmax only, keeps nothing)."""

    @staticmethod
    def forward(ctx, probe, query, key, value, call: _Call, module: nn.Module, output: Callable, *params):
        ctx.save_for_backward(query, key, value)
        ctx.same = (key is query, value is query, value is key)
        ctx.call, ctx.module = call, module
        ctx.tensor_inputs = (True, True, True, True, False, False, False) + (True,) * len(params)
        return output()

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        query, key, value = ctx.saved_tensors
        c: _Call = ctx.call
        m, needs, (qk, vq, vk) = ctx.module, _wanted(ctx), ctx.same
        held = c.switch.on
        with torch.enable_grad():
            q_leaf = query.detach().requires_grad_(needs[1] or (vq and needs[3]) or (qk and needs[2]))
            k_leaf = q_leaf if qk else key.detach().requires_grad_(needs[2] or (vk and needs[3]))
            v_leaf = q_leaf if vq else (k_leaf if vk else value.detach().requires_grad_(needs[3]))
            cached = getattr(ctx, "attn", None)
            if held and cached is not None:
                attn, v = cached, _mha_values(m, v_leaf)
            else:
                attn, v = _mha_probabilities(m, q_leaf, k_leaf, v_leaf, with_values=True)
        a, h = attn.detach(), _mha_output_to_heads(m)(g)
        ctx.attn = a if c.handoff.keep else None  # for a held pass over the retained graph
        grad_attn = h @ v.detach().transpose(-2, -1)
        c.handoff.deliver(c.index, a, grad_attn)
        grads = [g.new_zeros(0) if needs[0] else None] + [None] * (len(needs) - 1)
        params = mha_parameters(m)
        out_proj = (m.out_proj.weight, m.out_proj.bias)
        slots = [i for i, p in enumerate(params) if needs[7 + i] and not any(p is o for o in out_proj)]
        leaves = list({id(t): t for t in (q_leaf, k_leaf, v_leaf) if t.requires_grad}.values())
        wanted = leaves + [params[i] for i in slots]
        paths = [(v, a.transpose(-2, -1).to(h.dtype) @ h)] + ([] if held else [(attn, grad_attn)])
        paths = [(t, d) for t, d in paths if t.requires_grad]  # the values, and the scores unless held
        found: tuple = ()
        if wanted and paths:
            outputs, grad_outputs = zip(*paths)
            found = torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True)
        by_leaf = dict(zip(map(id, leaves), found[: len(leaves)]))
        for slot, leaf in ((1, q_leaf), (2, k_leaf), (3, v_leaf)):  # a tensor passed twice: its gradient once
            grads[slot] = by_leaf.pop(id(leaf), None)
        for i, d in zip(slots, found[len(leaves) :]):
            grads[7 + i] = d
        wants_out_proj = [needs[7 + i] for i, p in enumerate(params) if any(p is o for o in out_proj)]
        if any(wants_out_proj):  # out = merged W_oᵀ + b_o: ∂W_o = gᵀ merged, ∂b_o = Σ g (merged = A v)
            g2 = (g if m.batch_first else g.transpose(0, 1)).flatten(0, 1)
            merged = (a @ v.detach()).transpose(1, 2).flatten(2).flatten(0, 1)
            found_out = (g2.transpose(0, 1) @ merged.to(g2.dtype), g2.sum(0))
            for i, p in enumerate(params):
                for o, d in zip(out_proj, found_out):
                    if p is o and needs[7 + i]:
                        grads[7 + i] = d
        return tuple(grads)
