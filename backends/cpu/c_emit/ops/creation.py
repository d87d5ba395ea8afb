"""Tensors made from scratch: arange (timestep embeddings, RoPE), full / zeros / ones."""
from __future__ import annotations

import torch

from ..context import bind, literal, meta_val
from ..registry import emits

aten = torch.ops.aten


@emits(aten.arange.default, aten.arange.start, aten.arange.start_step)
def arange(g, node):
    a = bind(node)
    start = a.get("start") if node.target != aten.arange.default else 0
    step = a.get("step") or 1
    out = g.out(node)
    if out.dtype.is_floating_point:               # PyTorch computes start + i * step in double
        expr = f"({out.ctype})({literal(start, 'double')} + (double)i * {literal(step, 'double')})"
    else:
        expr = f"({out.ctype})({int(start)} + i * {int(step)})"
    g.line(f"for (long i = 0; i < {out.numel}; i++) {out.ptr}[i] = {expr};")
    return out


@emits(aten.full.default, aten.zeros.default, aten.ones.default)
def full(g, node):
    value = {aten.zeros.default: 0, aten.ones.default: 1}.get(node.target)
    if value is None:
        value = bind(node)["fill_value"]
    out = g.out(node, dtype=meta_val(node).dtype)
    g.line(f"for (long i = 0; i < {out.numel}; i++) {out.ptr}[i] = {literal(value, out.ctype)};")
    return out
