"""mean / sum over dimensions: reduced dims are moved last (a strided copy if needed), then each row
is summed in double precision."""
from __future__ import annotations

import math

import torch

from ..context import bind, contiguous_strides, unsupported
from ..registry import emits

aten = torch.ops.aten


def _reduce(g, node, mean: bool):
    a = bind(node)
    src = g.tensor(a["self"])
    if src.dtype not in (torch.float32, torch.float64) or (a.get("dtype") not in (None, src.dtype)):
        raise unsupported(node, f"{'mean' if mean else 'sum'} of {src.dtype}")
    nd = len(src.shape)
    dims = sorted({d % nd for d in (a.get("dim") or range(nd))})
    kept = [d for d in range(nd) if d not in dims]
    rows = math.prod(src.shape[d] for d in kept)
    cols = math.prod(src.shape[d] for d in dims)
    out = g.out(node)
    fn = "fbqc_sum_rows_f32" if src.dtype == torch.float32 else "fbqc_sum_rows_f64"
    if dims == list(range(nd - len(dims), nd)):
        g.line(f"{fn}({out.ptr}, {src.ptr}, {rows}, {cols}, {int(mean)});")
        return out
    perm = kept + dims
    shape = [src.shape[d] for d in perm]
    st = contiguous_strides(src.shape)
    g.line("{")
    g.line(f"    {src.ctype} *moved = fbqc_alloc({src.numel} * sizeof({src.ctype}));")
    g.copy("moved", src, 0, shape, contiguous_strides(shape), [st[d] for d in perm])
    g.line(f"    {fn}({out.ptr}, moved, {rows}, {cols}, {int(mean)});")
    g.line("    free(moved);")
    g.line("}")
    return out


@emits(aten.mean.dim, aten.mean.default)
def mean(g, node):
    return _reduce(g, node, mean=True)


@emits(aten.sum.dim_IntList, aten.sum.default)
def sum_(g, node):
    return _reduce(g, node, mean=False)
