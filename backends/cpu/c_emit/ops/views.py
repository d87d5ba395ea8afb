"""View and layout ops: aliases of contiguous sub-blocks, strided copies otherwise (also chunk/split
and their getitems, expand, repeat_interleave, pad, einsum permutations, dropout in eval)."""
from __future__ import annotations

import operator

import torch

from ..context import Multi, bind, contiguous_strides, literal, unsupported
from ..registry import emits

aten = torch.ops.aten

VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
         aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
         aten.squeeze.default, aten.permute.default, aten.transpose.int, aten.t.default,
         aten.expand.default, aten.slice.Tensor, aten.select.int, aten.narrow.default,
         aten.movedim.int, aten.alias.default, aten.detach.default, aten.contiguous.default,
         aten.clone.default, aten.lift_fresh_copy.default)
NO_META_KWARGS = ("memory_format",)


@emits(*VIEWS)
def view(g, node):
    src = g.tensor(node.args[0])
    kwargs = {k: v for k, v in node.kwargs.items() if k not in NO_META_KWARGS}
    return g.view(node, src, lambda t: node.target(t, *node.args[1:], **kwargs))


@emits(aten.dropout.default)
def dropout(g, node):
    a = bind(node)
    if a["train"] and a["p"] > 0:
        raise unsupported(node, "dropout in training mode")
    return g.view(node, g.tensor(a["input"]), lambda t: t)


@emits(aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
       aten.tensor_split.sections)
def multi_view(g, node):
    src = g.tensor(node.args[0])
    args, kwargs = node.args[1:], dict(node.kwargs)
    return Multi(src, lambda t, i: node.target(t, *args, **kwargs)[i])


@emits(operator.getitem)
def getitem(g, node):
    source, index = node.args
    multi = g.values.get(source)
    if not isinstance(multi, Multi):
        raise unsupported(node, f"getitem of {source.target}")
    return g.view(node, multi.source, lambda t: multi.view(t, index))


@emits(aten.repeat_interleave.self_int)
def repeat_interleave(g, node):
    a = bind(node)
    src = g.tensor(a["self"])
    if a["dim"] is None:
        raise unsupported(node, "repeat_interleave without dim")
    dim, r = a["dim"] % len(src.shape), int(a["repeats"])
    shape = list(src.shape)
    return g.view(node, src, lambda t: t.unsqueeze(dim + 1).expand(*shape[:dim + 1], r, *shape[dim + 1:]))


@emits(aten.einsum.default)
def einsum(g, node):
    equation, operands = node.args[0], node.args[1]
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    if len(operands) != 1 or "," in lhs or "..." in equation or sorted(lhs) != sorted(rhs) \
            or len(set(lhs)) != len(lhs):
        raise unsupported(node, f"einsum {equation!r} (only single-operand permutations)")
    perm = [lhs.index(c) for c in rhs]
    return g.view(node, g.tensor(operands[0]), lambda t: t.permute(perm))


@emits(aten.pad.default, aten.constant_pad_nd.default)
def pad(g, node):
    a = bind(node)
    if a.get("mode", "constant") != "constant":
        raise unsupported(node, f"pad mode {a['mode']!r}")
    src = g.tensor(a["input"] if "input" in a else a["self"])
    pads = [int(p) for p in a["pad"]]
    if any(p < 0 for p in pads):
        raise unsupported(node, "negative padding")
    out = g.out(node)
    value = a.get("value") or 0
    g.line(f"for (long i = 0; i < {out.numel}; i++) {out.ptr}[i] = {literal(value, out.ctype)};")
    ost = contiguous_strides(out.shape)
    offset = 0
    for k in range(len(pads) // 2):                # pads run from the last dim backwards
        offset += pads[2 * k] * ost[len(out.shape) - 1 - k]
    dst = out.ptr if offset == 0 else f"{out.ptr} + {offset}"
    g.copy(dst, src, 0, src.shape, ost, contiguous_strides(src.shape))
    return out
