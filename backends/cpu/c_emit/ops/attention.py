"""Softmax and scaled dot-product attention (no mask, no dropout: what the diffusion models use)."""
from __future__ import annotations

import math

import torch

from ..context import bind, literal, unsupported
from ..registry import emits

aten = torch.ops.aten


@emits(aten.scaled_dot_product_attention.default)
def sdpa(g, node):
    a = bind(node)
    if a["attn_mask"] is not None or a["dropout_p"] or a["is_causal"] or a.get("enable_gqa"):
        raise unsupported(node, "attention with a mask, dropout, causal masking or GQA")
    q, k, v = g.tensor(a["query"]), g.tensor(a["key"]), g.tensor(a["value"])
    if any(t.dtype != torch.float32 for t in (q, k, v)):
        raise unsupported(node, "attention on non-float32 tensors")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]:
        raise unsupported(node, f"attention with broadcast batch dims {q.shape}/{k.shape}/{v.shape}")
    bh = math.prod(q.shape[:-2])
    lq, d, lk, dv = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    out = g.out(node)
    g.line(f"fbqc_sdpa_f32({out.ptr}, {q.ptr}, {k.ptr}, {v.ptr}, {bh}, {lq}, {lk}, {d}, {dv}, "
           f"{literal(scale, 'float')});")
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
