"""layer_norm and rms_norm over the trailing ``normalized_shape`` dims (statistics in double)."""
from __future__ import annotations

import math

import torch

from ..context import bind, literal, unsupported
from ..registry import emits

aten = torch.ops.aten


def _rows(node, x, normalized_shape):
    cols = math.prod(int(s) for s in normalized_shape)
    if x.dtype != torch.float32:
        raise unsupported(node, f"normalization of {x.dtype}")
    return x.numel // max(cols, 1), cols


def _opt(g, arg):
    return g.tensor(arg).ptr if arg is not None else "NULL"


@emits(aten.layer_norm.default)
def layer_norm(g, node):
    a = bind(node)
    x = g.tensor(a["input"])
    rows, cols = _rows(node, x, a["normalized_shape"])
    w, b = _opt(g, a["weight"]), _opt(g, a["bias"])
    out = g.out(node)
    g.line(f"fbqc_layer_norm_f32({out.ptr}, {x.ptr}, {w}, {b}, {rows}, {cols}, {literal(a['eps'], 'float')});")
    return out


@emits(aten.rms_norm.default)
def rms_norm(g, node):
    a = bind(node)
    x = g.tensor(a["input"])
    rows, cols = _rows(node, x, a["normalized_shape"])
    eps = a["eps"] if a["eps"] is not None else float(torch.finfo(torch.float32).eps)
    out = g.out(node)
    g.line(f"fbqc_rms_norm_f32({out.ptr}, {x.ptr}, {_opt(g, a['weight'])}, {rows}, {cols}, "
           f"{literal(eps, 'float')});")
    return out
