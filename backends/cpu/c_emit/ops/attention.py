"""Softmax and scaled dot-product attention (an additive float mask, no dropout: what the diffusion
models use)."""
from __future__ import annotations

import math

import torch

from ..context import bind, literal, unsupported
from ..registry import emits

aten = torch.ops.aten


@emits(aten.scaled_dot_product_attention.default)
def sdpa(g, node):
    a = bind(node)
    if a["dropout_p"] or a["is_causal"] or a.get("enable_gqa"):
        raise unsupported(node, "attention with dropout, causal masking or GQA")
    q, k, v = g.tensor(a["query"]), g.tensor(a["key"]), g.tensor(a["value"])
    if any(t.dtype != torch.float32 for t in (q, k, v)):
        raise unsupported(node, "attention on non-float32 tensors")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]:
        raise unsupported(node, f"attention with broadcast batch dims {q.shape}/{k.shape}/{v.shape}")
    bh = math.prod(q.shape[:-2])
    lq, d, lk, dv = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    if a["attn_mask"] is not None:
        return _masked(g, node, q, k, v, g.tensor(a["attn_mask"]), scale)
    out = g.out(node)
    g.line(f"fbqc_sdpa_f32({out.ptr}, {q.ptr}, {k.ptr}, {v.ptr}, {bh}, {lq}, {lk}, {d}, {dv}, "
           f"{literal(scale, 'float')});")
    return out


def _masked(g, node, q, k, v, m, scale):
    """An additive float mask broadcast to (B, H, Lq, Lk) (diffusers' padding bias: 0 or -10000)."""
    if m.dtype != torch.float32 or len(q.shape) != 4 or len(m.shape) > 4:
        raise unsupported(node, f"attention mask {m.dtype} {m.shape} (an additive float32 mask of at most "
                                f"4 dims with 4-D queries is supported)")
    batch, heads, lq, d = q.shape
    lk, dv = k.shape[-2], v.shape[-1]
    shape = (1,) * (4 - len(m.shape)) + tuple(m.shape)
    if shape[0] not in (1, batch) or shape[1] not in (1, heads) or shape[2] not in (1, lq) or shape[3] != lk:
        raise unsupported(node, f"attention mask of shape {m.shape} for queries {q.shape}, keys {k.shape}")
    row = lk if shape[2] > 1 else 0
    head = shape[2] * lk if shape[1] > 1 else 0
    per_batch = shape[1] * shape[2] * lk if shape[0] > 1 else 0
    out = g.out(node)
    g.line(f"fbqc_sdpa_mask_f32({out.ptr}, {q.ptr}, {k.ptr}, {v.ptr}, {m.ptr}, {batch * heads}, {heads}, "
           f"{lq}, {lk}, {d}, {dv}, {literal(scale, 'float')}, {per_batch}, {head}, {row});")
    return out


@emits(aten.softmax.int, aten._softmax.default)
def softmax(g, node):
    a = bind(node)
    x = g.tensor(a["self"])
    if a["dim"] % len(x.shape) != len(x.shape) - 1 or x.dtype != torch.float32:
        raise unsupported(node, "softmax over a dim other than the last, or of non-float32")
    out = g.out(node)
    g.line(f"fbqc_softmax_f32({out.ptr}, {x.ptr}, {x.numel // x.shape[-1]}, {x.shape[-1]});")
    return out
