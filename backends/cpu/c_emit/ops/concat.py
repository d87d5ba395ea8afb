"""cat and stack: each input is copied into its slab of the output."""
from __future__ import annotations

import torch

from ..context import bind, contiguous_strides, unsupported
from ..registry import emits

aten = torch.ops.aten


def _join(g, node, stack: bool):
    a = bind(node)
    out = g.out(node)
    dim = a["dim"] % len(out.shape)
    ost = contiguous_strides(out.shape)
    offset = 0
    for t in a["tensors"]:
        v = g.tensor(t)
        if v.numel == 0:
            continue
        if v.dtype != out.dtype:
            raise unsupported(node, f"{'stack' if stack else 'cat'} of mixed types {v.dtype}/{out.dtype}")
        shape = list(v.shape)
        if stack:
            shape.insert(dim, 1)
        dst = out.ptr if offset == 0 else f"{out.ptr} + {offset * ost[dim]}"
        g.copy(dst, v, 0, shape, ost, contiguous_strides(shape))
        offset += shape[dim]
    return out


@emits(aten.cat.default)
def cat(g, node):
    return _join(g, node, stack=False)


@emits(aten.stack.default)
def stack(g, node):
    return _join(g, node, stack=True)
