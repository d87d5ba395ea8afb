"""Float matrix products: linear (layers kept in float), matmul / bmm / mm."""
from __future__ import annotations

import math

import torch

from ..context import bind, unsupported
from ..registry import emits

aten = torch.ops.aten


@emits(aten.linear.default)
def linear(g, node):
    a = bind(node)
    x, w = g.tensor(a["input"]), g.tensor(a["weight"])
    b = g.tensor(a["bias"]).ptr if a["bias"] is not None else "NULL"
    if x.dtype != torch.float32 or w.dtype != torch.float32 or len(w.shape) != 2:
        raise unsupported(node, f"linear of {x.dtype} by {w.dtype}{list(w.shape)}")
    n, k = w.shape
    out = g.out(node)
    g.line(f"fbqc_linear_f32({out.ptr}, {x.ptr}, {w.ptr}, {b}, {x.numel // k}, {k}, {n});")
    return out


@emits(aten.matmul.default, aten.bmm.default, aten.mm.default)
def matmul(g, node):
    x, y = g.tensor(node.args[0]), g.tensor(node.args[1])
    if x.dtype != torch.float32 or y.dtype != torch.float32 or len(x.shape) < 2 or len(y.shape) < 2:
        raise unsupported(node, f"matmul of {x.dtype}{list(x.shape)} by {y.dtype}{list(y.shape)}")
    m, k = x.shape[-2:]
    n = y.shape[-1]
    out = g.out(node)
    if len(y.shape) == 2:                          # (..., M, K) x (K, N): one product over all rows
        g.line(f"fbqc_gemm_f32({x.numel // k}, {n}, {k}, {x.ptr}, {k}, {y.ptr}, {n}, {out.ptr}, {n});")
    elif x.shape[:-2] == y.shape[:-2]:
        g.line(f"fbqc_bmm_f32({out.ptr}, {x.ptr}, {y.ptr}, {math.prod(x.shape[:-2])}, {m}, {k}, {n});")
    else:
        raise unsupported(node, f"matmul with broadcast batch dims {list(x.shape)} x {list(y.shape)}")
    return out
