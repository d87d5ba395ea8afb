"""fbqc's integer ops: quantize, dequantize, and the quantized layers qlinear / qconv2d_1x1.

A quantized layer becomes an entry of the ``FBQC_LAYERS`` table in model.c (its weight, scale,
zero-point and bias indices in weights.bin, and its activation quantizers) and one call of
``fbqc_qlinear`` / ``fbqc_qconv1x1`` (fbqc_quant.c), which can dump its int32 accumulators or be fed
the reference's input codes.
"""
from __future__ import annotations

import torch

from fbqc.errors import UserError
from fbqc.quant_math import act_container, act_qmax
from fbqc.spec import QUANT

from ..context import DTYPE_ENUM, bind, literal
from ..registry import emits

fbqc = torch.ops.fbqc


def _code_enum(dtype: torch.dtype) -> str:
    return DTYPE_ENUM[dtype]


@emits(fbqc.quantize.default)
def quantize(g, node):
    a = bind(node)
    x = g.tensor(a["x"])
    if x.dtype != torch.float32:
        raise UserError(f"--emit-c: node {node.name} quantizes a {x.dtype} tensor; expected float32")
    out = g.out(node, dtype=act_container(a["bits"]).dtype)
    g.line(f"fbqc_quantize({out.ptr}, {_code_enum(out.dtype)}, {x.ptr}, {x.numel}, "
           f"{literal(a['scale'], 'float')}, {int(a['zero_point'])}, {act_qmax(a['bits'])});")
    return out


@emits(fbqc.dequantize.default)
def dequantize(g, node):
    a = bind(node)
    q = g.tensor(a["q"])
    out = g.out(node, dtype=torch.float32)
    g.line(f"fbqc_dequantize({out.ptr}, {q.ptr}, {_code_enum(q.dtype)}, {q.numel}, "
           f"{literal(a['scale'], 'float')}, {int(a['zero_point'])});")
    return out


def _constant(g, node, arg, what: str, layer: str, *, int4: bool = False, dtype=None, numel=None,
              weight: bool = False) -> int:
    if arg is None:
        return -1
    if not (hasattr(arg, "op") and arg.op == "get_attr"):
        raise UserError(f"--emit-c: layer {layer} (node {node.name}): its {what} must be a constant")
    t = g.program.attr(arg)
    if dtype is not None and t.dtype != dtype:
        raise UserError(f"--emit-c: layer {layer}: {what} is {t.dtype}, expected {dtype}")
    if numel is not None and t.numel() != numel:
        raise UserError(f"--emit-c: layer {layer}: {what} has {t.numel()} elements, expected {numel}")
    return g.weights.index(arg.target, t, int4=int4, layer=layer if weight else None)


def _layer(g, node, kind: str) -> tuple[int, object, int]:
    a = bind(node)
    spec = node.meta.get(QUANT)
    layer = spec.layer if spec is not None else node.name
    xq = g.tensor(a["xq"])
    wq = g.program.attr(a["wq"]) if getattr(a["wq"], "op", "") == "get_attr" else None
    if wq is None:
        raise UserError(f"--emit-c: layer {layer} (node {node.name}): its weight must be a constant")
    n = wq.shape[0]
    k = wq.numel() // n
    if spec is not None:
        int4 = spec.weight.container.logical == "int4"
    else:
        int4 = wq.dtype == torch.int8 and (wq.numel() == 0 or (int(wq.min()) >= -8 and int(wq.max()) <= 7))
    entry = {
        "name": layer, "kind": kind, "K": k, "N": n, "node": node.name,
        "weight": _constant(g, node, a["wq"], "weight", layer, int4=int4, weight=True),
        "w_scale": _constant(g, node, a["w_scale"], "weight scale", layer, dtype=torch.float32, numel=n),
        "w_zp": _constant(g, node, a["w_zp"], "weight zero point", layer, dtype=torch.int32, numel=n),
        "bias": _constant(g, node, a["bias"], "bias", layer, dtype=torch.float32, numel=n),
        "x_dtype": xq.dtype, "y_dtype": act_container(a["y_bits"]).dtype,
        "x_scale": a["x_scale"], "x_zp": int(a["x_zp"]), "y_scale": a["y_scale"],
        "y_zp": int(a["y_zp"]), "y_qmax": act_qmax(a["y_bits"]),
    }
    if xq.dtype not in (act_container(8).dtype, act_container(16).dtype):
        raise UserError(f"--emit-c: layer {layer}: input codes of type {xq.dtype}")
    g.layers.append(entry)
    return len(g.layers) - 1, xq, k


@emits(fbqc.qlinear.default)
def qlinear(g, node):
    index, xq, k = _layer(g, node, "linear")
    out = g.out(node)
    g.line(f"fbqc_qlinear(ctx, {index}, {xq.ptr}, {out.ptr}, {xq.numel // k});  "
           f"/* {g.layers[index]['name']} */")
    return out


@emits(fbqc.qconv2d_1x1.default)
def qconv2d_1x1(g, node):
    index, xq, k = _layer(g, node, "conv1x1")
    if len(xq.shape) != 4 or xq.shape[1] != k:
        raise UserError(f"--emit-c: layer {g.layers[index]['name']}: expected NCHW codes with {k} channels")
    out = g.out(node)
    n, _, h, w = xq.shape
    g.line(f"fbqc_qconv1x1(ctx, {index}, {xq.ptr}, {out.ptr}, {n}, {h * w});  "
           f"/* {g.layers[index]['name']} */")
    return out


def layer_initializer(i: int, e: dict) -> str:
    """One designated initializer of the FBQC_LAYERS table."""
    kind = "FBQC_LINEAR" if e["kind"] == "linear" else "FBQC_CONV1X1"
    return (f'    /* {i} */ {{.name = "{e["name"]}", .kind = {kind}, .K = {e["K"]}, .N = {e["N"]}, '
            f'.weight = {e["weight"]}, .w_scale = {e["w_scale"]}, .w_zp = {e["w_zp"]}, .bias = {e["bias"]},\n'
            f'           .x_dtype = {DTYPE_ENUM[e["x_dtype"]]}, .y_dtype = {DTYPE_ENUM[e["y_dtype"]]}, '
            f'.x_scale = {literal(e["x_scale"], "float")}, .x_zp = {e["x_zp"]}, '
            f'.y_scale = {literal(e["y_scale"], "float")}, .y_zp = {e["y_zp"]}, .y_qmax = {e["y_qmax"]}}},')
