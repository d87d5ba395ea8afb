"""State of one C emission: values of nodes, C names and types, literals, code lines, liveness.

Every tensor is a contiguous row-major buffer. A :class:`Value` is a C pointer expression plus the
shape and dtype of the tensor behind it and the *storage* it lives in: a ``malloc``ed buffer
(freed after the last node that reads any value in it), a model input or a weight (never freed).
View operations produce values that alias their source at an element offset, or a strided copy.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from fbqc.errors import UserError

CTYPES = {torch.float32: "float", torch.float64: "double", torch.int64: "int64_t", torch.int32: "int32_t",
          torch.int16: "int16_t", torch.int8: "int8_t", torch.uint8: "uint8_t", torch.bool: "uint8_t"}
DTYPE_ENUM = {torch.float32: "FBQC_F32", torch.float64: "FBQC_F64", torch.int64: "FBQC_I64",
              torch.int32: "FBQC_I32", torch.int16: "FBQC_I16", torch.int8: "FBQC_I8", torch.uint8: "FBQC_U8",
              torch.bool: "FBQC_BOOL"}
#: math.h function suffix per floating C type
MATH_SUFFIX = {"float": "f", "double": ""}
#: elementwise loops at least this long are split over OpenMP threads (when built with -fopenmp)
PARALLEL_MIN = 1 << 15


def ctype(dtype: torch.dtype, where: str = "") -> str:
    if dtype not in CTYPES:
        raise UserError(f"--emit-c: tensors of type {dtype} are not supported{where}")
    return CTYPES[dtype]


def literal(value: Any, ct: str) -> str:
    """A C literal of ``value`` in C type ``ct`` that parses back to exactly the same number."""
    if ct in ("float", "double"):
        v = float(np.float32(value)) if ct == "float" else float(value)
        if math.isnan(v):
            return "NAN"
        if math.isinf(v):
            return "INFINITY" if v > 0 else "-INFINITY"
        text = str(np.float32(v)) if ct == "float" else repr(v)
        if not any(ch in text for ch in ".en"):
            text += ".0"
        return text + ("f" if ct == "float" else "")
    v = int(value)
    if ct == "int64_t" and not -2**31 < v < 2**31:
        return f"INT64_C({v})"
    return str(v)


def c_name(node_name: str) -> str:
    return "t_" + re.sub(r"\W", "_", node_name)


def contiguous_strides(shape) -> list[int]:
    strides, acc = [], 1
    for s in reversed(list(shape)):
        strides.append(acc)
        acc *= int(s)
    return strides[::-1]


@dataclass
class Value:
    """A tensor in the C program: ``ptr`` is a C expression of type ``const? T *``."""

    ptr: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    storage: str | None          # C name of the malloc'ed buffer it lives in; None: input/weight
    const: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ctype(self) -> str:
        return ctype(self.dtype)

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Multi:
    """A node returning several tensors that are views of one source (chunk, split, unbind)."""

    source: Value
    view: Callable[[torch.Tensor, int], torch.Tensor]   # (meta tensor, index) -> view


@dataclass
class Chunk:
    """The code of one node and the storages it reads."""

    node: fx.Node
    lines: list[str] = field(default_factory=list)
    reads: set[str] = field(default_factory=set)
    allocates: str | None = None


def meta_val(node: fx.Node):
    v = node.meta.get("val")
    if v is None:
        raise UserError(f"--emit-c: node {node.name} ({node.target}) has no shape information "
                        f"(meta['val']); re-export the program")
    return v


def collapse(shape, *strides_list):
    """Drop size-1 dims and merge dims that are contiguous in every strides list."""
    dims = [(int(s), [int(st[i]) for st in strides_list]) for i, s in enumerate(shape) if int(s) != 1]
    if not dims:
        return [1], [[0] for _ in strides_list]
    out_shape, out_strides = [dims[0][0]], [[s] for s in dims[0][1]]
    for size, sts in dims[1:]:
        if all(prev[-1] == s * size for prev, s in zip(out_strides, sts)):
            out_shape[-1] *= size
            for prev, s in zip(out_strides, sts):
                prev[-1] = s
        else:
            out_shape.append(size)
            for prev, s in zip(out_strides, sts):
                prev.append(s)
    return out_shape, out_strides


def long_array(values) -> str:
    return "(const long[]){" + ", ".join(str(int(v)) for v in values) + "}"


def bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def unsupported(node: fx.Node, what: str) -> UserError:
    return UserError(f"--emit-c: node {node.name} ({node.target}): {what} is not supported by the C "
                     f"generator")
