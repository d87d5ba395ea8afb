"""Elementwise ops with broadcasting: arithmetic, activations, transcendental functions and casts.

Each becomes a loop nest in model.c computing in the output's C type (float for float32, double
for float64), with Python scalars converted to that type first, as PyTorch does. The formulas of
the activations are PyTorch's (GELU exact and tanh, SiLU = x / (1 + exp(-x))).
"""
from __future__ import annotations

import math

import torch

from ..context import MATH_SUFFIX, bind, literal, meta_val, unsupported
from ..registry import emits

aten = torch.ops.aten


def _fn(g, node, name: str, ct: str) -> str:
    if ct not in MATH_SUFFIX:
        raise unsupported(node, f"{name} on {ct}")
    return name + MATH_SUFFIX[ct]


def _compute(node) -> str:
    from ..context import ctype
    return ctype(meta_val(node).dtype, f" (node {node.name})")


def _binary(g, node, fmt):
    a = bind(node)
    x, y = g.scalar_or_tensor(a["self"]), g.scalar_or_tensor(a["other"])
    alpha = a.get("alpha", 1)
    ct = _compute(node)
    al = None if alpha in (None, 1) else literal(alpha, ct)
    return g.elementwise(node, [x, y], lambda p, q: fmt(p, q if al is None else f"{al} * {q}"))


@emits(aten.add.Tensor, aten.add.Scalar)
def add(g, node):
    return _binary(g, node, lambda p, q: f"{p} + {q}")


@emits(aten.sub.Tensor, aten.sub.Scalar)
def sub(g, node):
    return _binary(g, node, lambda p, q: f"{p} - {q}")


@emits(aten.rsub.Scalar, aten.rsub.Tensor)
def rsub(g, node):
    a = bind(node)                                 # other - alpha * self
    x, y = g.scalar_or_tensor(a["self"]), g.scalar_or_tensor(a["other"])
    al = "" if a["alpha"] in (None, 1) else f"{literal(a['alpha'], _compute(node))} * "
    return g.elementwise(node, [x, y], lambda p, q: f"{q} - {al}{p}")


@emits(aten.mul.Tensor, aten.mul.Scalar)
def mul(g, node):
    return _binary(g, node, lambda p, q: f"{p} * {q}")


@emits(aten.div.Tensor, aten.div.Scalar)
def div(g, node):
    if not meta_val(node).dtype.is_floating_point:
        raise unsupported(node, "integer true division")
    return _binary(g, node, lambda p, q: f"{p} / {q}")


def _unary(g, node, fmt):
    ct = _compute(node)
    return g.elementwise(node, [g.tensor(node.args[0])], lambda p: fmt(p, ct))


@emits(aten.neg.default)
def neg(g, node):
    return _unary(g, node, lambda p, ct: f"-{p}")


@emits(aten.exp.default, aten.sin.default, aten.cos.default, aten.sqrt.default, aten.tanh.default,
       aten.log.default, aten.abs.default)
def math_fn(g, node):
    name = {"abs": "fabs"}.get(node.target._opname, node.target._opname)
    return _unary(g, node, lambda p, ct: f"{_fn(g, node, name, ct)}({p})")


@emits(aten.rsqrt.default)
def rsqrt(g, node):
    return _unary(g, node, lambda p, ct: f"{literal(1, ct)} / {_fn(g, node, 'sqrt', ct)}({p})")


@emits(aten.reciprocal.default)
def reciprocal(g, node):
    return _unary(g, node, lambda p, ct: f"{literal(1, ct)} / {p}")


@emits(aten.relu.default)
def relu(g, node):
    return _unary(g, node, lambda p, ct: f"{p} > {literal(0, ct)} ? {p} : {literal(0, ct)}")


@emits(aten.sigmoid.default)
def sigmoid(g, node):
    return _unary(g, node, lambda p, ct: f"{literal(1, ct)} / ({literal(1, ct)} + {_fn(g, node, 'exp', ct)}(-{p}))")


@emits(aten.silu.default)
def silu(g, node):
    return _unary(g, node, lambda p, ct: f"{p} / ({literal(1, ct)} + {_fn(g, node, 'exp', ct)}(-{p}))")


@emits(aten.gelu.default)
def gelu(g, node):
    approximate = bind(node)["approximate"]
    if approximate == "tanh":
        def fmt(p, ct):
            beta, kappa = literal(math.sqrt(2.0 / math.pi), ct), literal(0.044715, ct)
            return (f"{literal(0.5, ct)} * {p} * ({literal(1, ct)} + {_fn(g, node, 'tanh', ct)}({beta} * "
                    f"({p} + {kappa} * {p} * {p} * {p})))")
    elif approximate == "none":
        def fmt(p, ct):
            return (f"{p} * {literal(0.5, ct)} * ({literal(1, ct)} + {_fn(g, node, 'erf', ct)}({p} * "
                    f"{literal(math.sqrt(0.5), ct)}))")
    else:
        raise unsupported(node, f"gelu approximate={approximate!r}")
    return _unary(g, node, fmt)


@emits(aten.pow.Tensor_Scalar)
def pow_tensor_scalar(g, node):
    e = float(node.args[1])
    special = {2.0: lambda p, ct: f"{p} * {p}", 3.0: lambda p, ct: f"{p} * {p} * {p}", 1.0: lambda p, ct: p,
               0.5: lambda p, ct: f"{_fn(g, node, 'sqrt', ct)}({p})",
               -0.5: lambda p, ct: f"{literal(1, ct)} / {_fn(g, node, 'sqrt', ct)}({p})",
               -1.0: lambda p, ct: f"{literal(1, ct)} / {p}"}
    if e in special:
        return _unary(g, node, special[e])
    return _unary(g, node, lambda p, ct: f"{_fn(g, node, 'pow', ct)}({p}, {literal(e, ct)})")


@emits(aten.pow.Scalar, aten.pow.Tensor_Tensor)
def pow_general(g, node):
    a = bind(node)
    base, exp = g.scalar_or_tensor(a["self"]), g.scalar_or_tensor(a["exponent"])
    ct = _compute(node)
    return g.elementwise(node, [base, exp], lambda p, q: f"{_fn(g, node, 'pow', ct)}({p}, {q})")


@emits(aten.outer.default)
def outer(g, node):
    x, y = g.tensor(node.args[0]), g.tensor(node.args[1])
    return g.elementwise(node, [x, y], lambda p, q: f"{p} * {q}", shapes=[(x.numel, 1), (1, y.numel)])


@emits(aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device)
def cast(g, node):
    src = g.tensor(node.args[0])
    dtype = meta_val(node).dtype
    if dtype == src.dtype:
        return g.view(node, src, lambda t: t)
    if dtype == torch.bool:
        return g.elementwise(node, [src], lambda p: f"{p} != 0", compute=src.ctype)
    return g.elementwise(node, [src], lambda p: p)
