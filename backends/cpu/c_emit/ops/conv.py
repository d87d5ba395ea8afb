"""2-D convolution (patch embedding, depthwise 3x3 of Sana's Mix-FFN), direct loops."""
from __future__ import annotations

import torch

from ..context import bind, unsupported
from ..registry import emits

aten = torch.ops.aten


def _pair(v):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(x) for x in (v * 2 if len(v) == 1 else v)]


@emits(aten.conv2d.default)
def conv2d(g, node):
    a = bind(node)
    x, w = g.tensor(a["input"]), g.tensor(a["weight"])
    if isinstance(a["padding"], str):
        raise unsupported(node, f"padding={a['padding']!r}")
    if x.dtype != torch.float32 or len(x.shape) != 4:
        raise unsupported(node, f"conv2d of {x.dtype}{list(x.shape)}")
    b = g.tensor(a["bias"]).ptr if a["bias"] is not None else "NULL"
    (sh, sw), (ph, pw), (dh, dw) = _pair(a["stride"]), _pair(a["padding"]), _pair(a["dilation"])
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    out = g.out(node)
    oh, ow = out.shape[2], out.shape[3]
    g.line(f"fbqc_conv2d_f32({out.ptr}, {x.ptr}, {w.ptr}, {b}, {n}, {c}, {h}, {wd}, {o}, {kh}, {kw}, "
           f"{sh}, {sw}, {ph}, {pw}, {dh}, {dw}, {int(a['groups'])}, {oh}, {ow});")
    return out
