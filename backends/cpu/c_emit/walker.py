"""The graph walker: walks an INTEGER program's graph and asks each op's emitter for the C lines of
``c/model.c``'s body (``files.py`` writes them, with every other file, into the artifact).

Emitters (``ops/*.py``) call back into :class:`GraphWalker` for operands (:meth:`tensor`), result buffers
(:meth:`out`), aliases and strided copies (:meth:`view`, :meth:`copy`) and elementwise loops
(:meth:`elementwise`). After the walk, ``free()`` calls are placed after the last reader of each
buffer.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from fbqc.errors import UserError
from fbqc.program import Program

from .context import (PARALLEL_MIN, Chunk, Multi, Value, c_name, collapse, contiguous_strides, ctype,
                      literal, long_array, meta_val)
from .registry import emitter_for
from .weights import WeightTable


class GraphWalker:
    def __init__(self, program: Program, weights: WeightTable):
        self.program = program
        self.weights = weights
        self.values: dict[fx.Node, Value | Multi | None] = {}
        self.chunks: list[Chunk] = []
        self.layers: list[dict[str, Any]] = []        # quantized layers, in graph order
        self.inputs: list[Value] = []
        self.input_names: list[str] = []              # their placeholders (non-tensor leaves are no input)
        self.outputs: list[Value] = []
        self._declared_weights: dict[str, Value] = {}
        self._chunk: Chunk | None = None

    # ---- walking ---------------------------------------------------------------------------
    def run(self) -> list[str]:
        for node in self.program.graph.nodes:
            self._chunk = Chunk(node)
            self.chunks.append(self._chunk)
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "get_attr":
                self.values[node] = None          # declared where first read (see tensor())
            elif node.op == "call_function":
                emit = emitter_for(node)
                self.line(f"/* {node.name} = {_describe(node)} */")
                result = emit(self, node)
                self.values[node] = result
            elif node.op == "output":
                self._output(node)
            else:
                raise UserError(f"--emit-c: cannot emit {node.op} node {node.name}")
        return self._body()

    def _placeholder(self, node: fx.Node) -> None:
        t = node.meta.get("val")
        if not node.users and not isinstance(t, torch.Tensor):
            return                                # a non-tensor input leaf the graph never reads (None)
        t = meta_val(node)
        if not isinstance(t, torch.Tensor):
            raise UserError(f"--emit-c: input {node.name} is a {type(t).__name__}, only tensor inputs "
                            f"are supported")
        ct = ctype(t.dtype, f" (input {node.name})")
        name = c_name(node.name)
        self.line(f"const {ct} *{name} = (const {ct} *)inputs[{len(self.inputs)}];")
        v = Value(name, t.dtype, tuple(t.shape), None, const=True)
        self.inputs.append(v)
        self.input_names.append(node.name)
        self.values[node] = v

    def _output(self, node: fx.Node) -> None:
        leaves, _ = torch.utils._pytree.tree_flatten(node.args[0])
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, fx.Node):
                raise UserError(f"--emit-c: output {i} is a constant ({leaf!r}), not a tensor")
            v = self.tensor(leaf)
            self.line(f"memcpy(outputs[{i}], {v.ptr}, {v.numel} * sizeof({v.ctype}));")
            self.outputs.append(v)

    def _body(self) -> list[str]:
        last: dict[str, int] = {}
        for i, ch in enumerate(self.chunks):
            for s in ch.reads | ({ch.allocates} if ch.allocates else set()):
                last[s] = i
        frees: dict[int, list[str]] = {}
        for s, i in last.items():
            frees.setdefault(i, []).append(s)
        lines = []
        for i, ch in enumerate(self.chunks):
            lines += ch.lines
            lines += [f"free({s});" for s in sorted(frees.get(i, []))]
        return lines

    # ---- services for emitters -------------------------------------------------------------
    def line(self, text: str) -> None:
        self._chunk.lines.append(text)

    def tensor(self, arg: Any) -> Value:
        """The Value of a node argument (a tensor); records that the current node reads it."""
        if not isinstance(arg, fx.Node):
            raise UserError(f"--emit-c: node {self._chunk.node.name} expects a tensor, got {arg!r}")
        if arg.op == "get_attr":
            v = self._weight_value(arg)
        else:
            v = self.values.get(arg)
            if not isinstance(v, Value):
                raise UserError(f"--emit-c: node {self._chunk.node.name} reads {arg.name}, which is not "
                                f"a tensor")
        if v.storage:
            self._chunk.reads.add(v.storage)
        return v

    def _weight_value(self, node: fx.Node) -> Value:
        if node.target in self._declared_weights:
            return self._declared_weights[node.target]
        t = self.program.attr(node)
        idx = self.weights.index(node.target, t)
        if self.weights.entry(idx).dtype == "int4":
            raise UserError(f"--emit-c: int4 weight {node.target} is read by {self._chunk.node.name}; "
                            f"only quantized layers can read packed weights")
        ct = ctype(t.dtype, f" (weight {node.target})")
        name = "w_" + c_name(node.target)[2:]
        self._chunk.lines.insert(0, f"const {ct} *{name} = (const {ct} *)fbqc_weight(ctx, {idx});"
                                    f"  /* {node.target} {list(t.shape)} */")
        v = Value(name, t.dtype, tuple(t.shape), None, const=True)
        self._declared_weights[node.target] = v
        return v

    def scalar_or_tensor(self, arg: Any) -> Value | int | float | bool:
        return self.tensor(arg) if isinstance(arg, fx.Node) else arg

    def out(self, node: fx.Node, dtype: torch.dtype | None = None, shape=None) -> Value:
        """A new buffer for the result of ``node`` (shape and dtype from its meta unless given)."""
        t = meta_val(node)
        dtype = dtype or t.dtype
        shape = tuple(int(s) for s in (shape if shape is not None else t.shape))
        ct = ctype(dtype, f" (node {node.name})")
        name = c_name(node.name)
        n = 1
        for s in shape:
            n *= s
        self.line(f"{ct} *{name} = fbqc_alloc({n} * sizeof({ct}));")
        self._chunk.allocates = name
        return Value(name, dtype, shape, name)

    def alias(self, node: fx.Node, src: Value, offset: int = 0, shape=None) -> Value:
        t = meta_val(node)
        name = c_name(node.name)
        const = "const " if src.const else ""
        ptr = src.ptr if offset == 0 else f"{src.ptr} + {offset}"
        self.line(f"{const}{src.ctype} *{name} = {ptr};")
        if src.storage:
            self._chunk.reads.add(src.storage)
        return Value(name, src.dtype, tuple(int(s) for s in (shape or t.shape)), src.storage, src.const)

    def meta_of(self, v: Value) -> torch.Tensor:
        return torch.empty(v.shape, dtype=v.dtype, device="meta")

    def view(self, node: fx.Node, src: Value, fn: Callable[[torch.Tensor], torch.Tensor]) -> Value:
        """Result of a view op: ``fn`` maps a contiguous meta tensor of ``src``'s shape to a view whose
        row-major element order is the node's output. Contiguous views alias; others are copied."""
        r = fn(self.meta_of(src))
        out_shape = tuple(int(s) for s in meta_val(node).shape)
        if r.numel() != src.numel and r.numel() != _prod(out_shape):
            raise UserError(f"--emit-c: view {node.name} has {r.numel()} elements, expected "
                            f"{_prod(out_shape)}")
        if r.is_contiguous() or r.numel() <= 1:
            return self.alias(node, src, int(r.storage_offset()), out_shape)
        v = self.out(node)
        shape, (dst_st, src_st) = collapse(r.shape, contiguous_strides(r.shape), r.stride())
        self.copy(v.ptr, src, int(r.storage_offset()), shape, dst_st, src_st)
        return v

    def copy(self, dst_ptr: str, src: Value, src_offset: int, shape, dst_strides, src_strides) -> None:
        shape, (dst_strides, src_strides) = collapse(shape, dst_strides, src_strides)
        if src.storage:
            self._chunk.reads.add(src.storage)
        sp = src.ptr if src_offset == 0 else f"{src.ptr} + {src_offset}"
        self.line(f"fbqc_copy({dst_ptr}, {sp}, {src.elem}, {len(shape)}, {long_array(shape)}, "
                  f"{long_array(dst_strides)}, {long_array(src_strides)});")

    def elementwise(self, node: fx.Node, operands: Sequence[Value | int | float | bool],
                    expr: Callable[..., str], *, compute: str | None = None,
                    shapes: Sequence[tuple[int, ...]] | None = None) -> Value:
        """out[i] = expr(a[i], b[i], ...) with broadcasting; ``expr`` gets C expressions of the
        operands (tensor operands as local variables of the compute type, scalars as literals).
        ``shapes`` overrides the broadcast shape of tensor operands (e.g. outer products)."""
        out = self.out(node)
        ct = compute or out.ctype
        oshape = out.shape
        out_st = contiguous_strides(oshape)
        args, loads, strides_list, names = [], [], [], "abcdefgh"
        for i, op in enumerate(operands):
            if isinstance(op, Value):
                shp = tuple(shapes[i]) if shapes else op.shape
                strides_list.append(_broadcast_strides(shp, oshape, node))
                cast = "" if op.ctype == ct else f"({ct})"
                loads.append((names[i], op, cast))
                args.append(names[i])
            else:
                args.append(literal(op, ct))
        shape, sts = collapse(oshape, out_st, *strides_list)
        idx = [f"i{d}" for d in range(len(shape))]

        def index(strides):
            terms = [(f"{i}" if s == 1 else f"{i} * {s}") for i, s in zip(idx, strides) if s != 0]
            return " + ".join(terms) or "0"

        body = [f"const {ct} {n} = {cast}{op.ptr}[{index(st)}];"
                for (n, op, cast), st in zip(loads, sts[1:])]
        result = expr(*args)
        if out.ctype != ct:
            result = f"({out.ctype})({result})"
        body.append(f"{out.ptr}[{index(sts[0])}] = {result};")
        if out.numel >= PARALLEL_MIN:
            self.line("FBQC_PARALLEL_FOR")
        for d, (i, n) in enumerate(zip(idx, shape)):
            self.line("    " * d + f"for (long {i} = 0; {i} < {n}; {i}++)" + (" {" if d == len(shape) - 1 else ""))
        pad = "    " * len(shape)
        for b in body:
            self.line(pad + b)
        self.line("    " * (len(shape) - 1) + "}")
        return out

    def current(self) -> fx.Node:
        return self._chunk.node


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _broadcast_strides(shape, out_shape, node) -> list[int]:
    shape = list(shape)
    if len(shape) > len(out_shape):
        raise UserError(f"--emit-c: node {node.name}: operand of shape {shape} does not broadcast to "
                        f"{list(out_shape)}")
    shape = [1] * (len(out_shape) - len(shape)) + shape
    st = contiguous_strides(shape)
    res = []
    for s, o, stride in zip(shape, out_shape, st):
        if s == o:
            res.append(stride if s != 1 else 0)
        elif s == 1:
            res.append(0)
        else:
            raise UserError(f"--emit-c: node {node.name}: operand of shape {shape} does not broadcast "
                            f"to {list(out_shape)}")
    return res


def _describe(node: fx.Node) -> str:
    def fmt(a):
        if isinstance(a, fx.Node):
            return a.name
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in a) + "]"
        if isinstance(a, float):
            return f"{a:.6g}"
        return str(a)
    args = ", ".join([fmt(a) for a in node.args] + [f"{k}={fmt(v)}" for k, v in node.kwargs.items()
                                                      if k not in ("device", "layout", "pin_memory")])
    target = "getitem" if node.target is operator.getitem else str(node.target)
    v = node.meta.get("val")
    res = f" -> {str(v.dtype).removeprefix('torch.')}{list(v.shape)}" if isinstance(v, torch.Tensor) else ""
    return f"{target}({args}){res}".replace("*/", "* /")
