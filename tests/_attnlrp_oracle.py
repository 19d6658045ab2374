"""A small pre-norm transformer on input embeddings, and AttnLRP of it written out as relevance redistribution.

The oracle shares no code with the rules: it reads the model's weights as plain tensors, runs the forward
pass with plain tensor operations, and redistributes relevance layer by layer with AttnLRP's rules in their
relevance form (Achtibat et al., ICML 2024): ε-rule with ε → 0 (z-rule) on linear layers and residual
additions, the identity rule on LayerNorm (on the centred input, σ constant), RMSNorm and activations, the
uniform rule on ``q kᵀ``, ``A v`` and the gated product, deep Taylor with the bias term on the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backprop_hooks import testing


class Tiny(nn.Module):
    """``style="vit"``: LayerNorm, GELU MLP, bidirectional attention with a key padding mask, read at token 0;
    ``style="llama"``: RMSNorm, SiLU-gated MLP, causal attention, read at the last token. Attention through
    ``F.scaled_dot_product_attention`` or written out (``explicit``); ``scores="linear"``: no softmax
    (``A = q kᵀ · scale``, written out). Input: embeddings (B, N, D); a learned position embedding is added."""

    def __init__(self, d=8, heads=2, layers=2, classes=3, length=5, style="vit", explicit=False, scores="softmax"):
        super().__init__()
        self.style, self.explicit, self.scores, self.heads = style, explicit, scores, heads
        self.num_classes, self.input_shape = classes, (length, d)
        norm = nn.LayerNorm if style == "vit" else nn.RMSNorm
        self.pos = nn.Parameter(torch.zeros(length, d))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            b = nn.Module()
            b.n1, b.qkv, b.proj, b.n2 = norm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), norm(d)
            if style == "vit":
                b.fc1, b.act, b.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
            else:
                b.gate, b.up, b.act, b.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d)
            self.blocks.append(b)
        self.norm, self.head = norm(d), nn.Linear(d, classes)
        self.key_mask = None  # (B, N) bool, True: a real token

    def allowed(self, x):
        """(B, 1, N, N) bool: which keys each query may attend to."""
        b, n, _ = x.shape
        keys = torch.ones(b, n, dtype=torch.bool) if self.key_mask is None else self.key_mask[:b]
        allowed = keys[:, None, None, :].expand(b, 1, n, n)
        if self.style == "llama":
            allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
        return allowed

    def attend(self, q, k, v, allowed):
        scale = q.shape[-1] ** -0.5
        if self.scores == "linear":
            return ((q @ k.transpose(-2, -1)) * scale * allowed) @ v
        if not self.explicit:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        s = (q @ k.transpose(-2, -1)) * scale
        return s.masked_fill(~allowed, torch.finfo(s.dtype).min).softmax(dim=-1) @ v

    def forward(self, x):
        b, n, d = x.shape
        allowed = self.allowed(x)
        h = x + self.pos[:n]
        for blk in self.blocks:
            q, k, v = blk.qkv(blk.n1(h)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            h = h + blk.proj(self.attend(q, k, v, allowed).transpose(1, 2).reshape(b, n, d))
            y = blk.n2(h)
            mlp = blk.fc2(blk.act(blk.fc1(y))) if self.style == "vit" else blk.down(blk.act(blk.gate(y)) * blk.up(y))
            h = h + mlp
        read = 0 if self.style == "vit" else n - 1
        return self.head(self.norm(h)[:, read])


def tiny(seed, biases=True, **options):
    """A random ``Tiny`` in float64; ``biases=False``: every bias and the position embedding zero."""
    model = testing.randomize(Tiny(**options), seed)
    if not biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or name == "pos":
                    p.zero_()
    return model


# ------------------------------------------------------------------------------------------ the oracle
def _linear(x, weight, z, r_z):
    """ε-rule, ε → 0: ``R_x,i = Σ_j x_i w_ji R_z,j / z_j`` (``z`` includes the bias)."""
    return x * ((r_z / z) @ weight)


def _norm_forward(m, x):
    if isinstance(m, nn.LayerNorm):
        c = x - x.mean(-1, keepdim=True)
        sigma = (c.pow(2).mean(-1, keepdim=True) + m.eps).sqrt()
        return c * m.weight.detach() / sigma + m.bias.detach(), (c, sigma)
    inv = (x.pow(2).mean(-1, keepdim=True) + (m.eps or torch.finfo(x.dtype).eps)).rsqrt()
    return x * inv * m.weight.detach(), (inv,)


def _norm_relevance(m, x, y, parts, r_y):
    if isinstance(m, nn.LayerNorm):  # y = c ⊙ w/σ + b (σ constant): ε-rule; then the centring c = (I − 1/D) x
        c, sigma = parts
        r_c = c * m.weight.detach() / sigma * r_y / y
        d = x.shape[-1]
        centring = torch.eye(d, dtype=x.dtype) - 1.0 / d
        return x * ((r_c / c) @ centring)
    (inv,) = parts  # y = x ⊙ w/rms (rms constant)
    return x * inv * m.weight.detach() * r_y / y


def _act(m, z):
    return F.gelu(z) if isinstance(m, nn.GELU) else F.silu(z)


def attnlrp_oracle(model: Tiny, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The relevance of every input element, (B, N, D), for the relevance ``y ⊙ seed`` at the logits."""
    x = x.detach()
    b, n, d = x.shape
    heads, dh = model.heads, d // model.heads
    allowed = model.allowed(x)
    scale = dh**-0.5

    def split(t):
        return t.view(b, n, heads, dh).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(b, n, d)

    # forward, keeping what the relevance pass needs
    x0 = x + model.pos.detach()[:n]
    h, saved = x0, []
    for blk in model.blocks:
        s = {"h": h}
        s["y1"], s["p1"] = _norm_forward(blk.n1, h)
        s["zqkv"] = s["y1"] @ blk.qkv.weight.detach().T + blk.qkv.bias.detach()
        q, k, v = (split(t) for t in s["zqkv"].split(d, dim=-1))
        prod = q @ k.transpose(-2, -1)
        if model.scores == "linear":
            a = prod * scale * allowed
        else:
            a = (prod * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
        o = a @ v
        s.update(q=q, k=k, v=v, prod=prod, a=a, o=o, om=merge(o))
        s["zp"] = s["om"] @ blk.proj.weight.detach().T + blk.proj.bias.detach()
        s["h2"] = h2 = h + s["zp"]
        s["y2"], s["p2"] = _norm_forward(blk.n2, h2)
        if model.style == "vit":
            s["z1"] = s["y2"] @ blk.fc1.weight.detach().T + blk.fc1.bias.detach()
            s["a1"] = _act(blk.act, s["z1"])
            s["z2"] = s["a1"] @ blk.fc2.weight.detach().T + blk.fc2.bias.detach()
        else:
            s["zg"] = s["y2"] @ blk.gate.weight.detach().T + blk.gate.bias.detach()
            s["zu"] = s["y2"] @ blk.up.weight.detach().T + blk.up.bias.detach()
            s["m"] = _act(blk.act, s["zg"]) * s["zu"]
            s["z2"] = s["m"] @ blk.down.weight.detach().T + blk.down.bias.detach()
        h = h2 + s["z2"]
        s["h3"] = h
        saved.append(s)
    hf, pf = _norm_forward(model.norm, h)
    read = 0 if model.style == "vit" else n - 1
    y = hf[:, read] @ model.head.weight.detach().T + model.head.bias.detach()

    # relevance, from the logits down
    r_hf = torch.zeros_like(hf)
    r_hf[:, read] = _linear(hf[:, read], model.head.weight.detach(), y, y * seed)
    r_h = _norm_relevance(model.norm, h, hf, pf, r_hf)
    for blk, s in zip(reversed(model.blocks), reversed(saved)):
        h2, h3 = s["h2"], s["h3"]
        r_z2, r_h2 = s["z2"] / h3 * r_h, h2 / h3 * r_h  # residual: z-rule
        if model.style == "vit":
            r_z1 = _linear(s["a1"], blk.fc2.weight.detach(), s["z2"], r_z2)  # identity rule on GELU: R_z1 = R_a1
            r_y2 = _linear(s["y2"], blk.fc1.weight.detach(), s["z1"], r_z1)
        else:
            r_m = _linear(s["m"], blk.down.weight.detach(), s["z2"], r_z2)
            r_zg, r_zu = r_m / 2, r_m / 2  # uniform rule on the gated product; identity rule on SiLU
            r_y2 = _linear(s["y2"], blk.gate.weight.detach(), s["zg"], r_zg)
            r_y2 = r_y2 + _linear(s["y2"], blk.up.weight.detach(), s["zu"], r_zu)
        r_h2 = r_h2 + _norm_relevance(blk.n2, h2, s["y2"], s["p2"], r_y2)
        h = s["h"]
        r_zp, r_h = s["zp"] / h2 * r_h2, h / h2 * r_h2
        r_o = split(_linear(s["om"], blk.proj.weight.detach(), s["zp"], r_zp))
        a, v, o, q, k, prod = (s[key] for key in ("a", "v", "o", "q", "k", "prod"))
        ratio = r_o / o
        r_a = 0.5 * a * (ratio @ v.transpose(-2, -1))  # A v: z-rule over the sum, uniform over each product
        r_v = 0.5 * v * (a.transpose(-2, -1) @ ratio)
        if model.scores == "linear":
            r_prod = r_a  # A = prod · scale · mask: linear in prod
        else:  # softmax, deep Taylor with the bias term: R_S = S ⊙ (R_A − A Σ_j R_A,j)
            scores = prod * scale
            r_s = scores * (r_a - a * r_a.sum(-1, keepdim=True))
            r_prod = torch.where(allowed, r_s, torch.zeros_like(r_s))  # S = scale · prod: linear
        ratio = r_prod / prod
        r_q = 0.5 * q * (ratio @ k)
        r_k = 0.5 * k * (ratio.transpose(-2, -1) @ q)
        r_zqkv = torch.cat([merge(r_q), merge(r_k), merge(r_v)], dim=-1)
        r_y1 = _linear(s["y1"], blk.qkv.weight.detach(), s["zqkv"], r_zqkv)
        r_h = r_h + _norm_relevance(blk.n1, h, s["y1"], s["p1"], r_y1)
    return x / x0 * r_h  # the position embedding is a bias: z-rule at x0 = x + pos
