"""Torch-side preparation of an INTEGER program for the HTP (before the ONNX export).

1. Each ``quantize → qlinear | qconv2d_1x1 → dequantize`` becomes one ``fbqc_htp::qdq_linear`` /
   ``qdq_conv1x1`` (see :mod:`.ops`); linear weights are stored (K, N) so the ONNX weight
   ``DequantizeLinear(axis=1)`` feeds the MatMul/Gemm directly, with an explicit all-zero zero point.
2. Inputs that only feed 64-bit computation (FLUX's float64 RoPE from ``img_ids``/``txt_ids``) are
   *baked*: replaced by their example values; the artifact is specialised to them and the runner
   checks that a caller passes the same values.
3. Constant subgraphs are folded to constants (float64 results → float32): the HTP has no float64 or
   int64 compute. Integer (int64) inputs become int32 inputs (the runner casts, range-checked).
4. Shapes are static: a symbolic dim is an error (reported by :func:`check_static`).

The prepared program computes exactly what the INTEGER program computes (the eager kernels of the
``fbqc_htp`` ops are the reference kernels), which the tests check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fbqc.ops import integer as int_ops
from fbqc.fx_utils import meta_val
from fbqc.program import Program
from fbqc.spec import QUANT, QuantSpec
from fbqc.stage import Stage

from . import ops  # noqa: F401  registers torch.ops.fbqc_htp

fbqc = torch.ops.fbqc
htp = torch.ops.fbqc_htp
LAYER_OPS = {fbqc.qlinear.default: "linear", fbqc.qconv2d_1x1.default: "conv1x1"}
QDQ_OPS = {"linear": htp.qdq_linear.default, "conv1x1": htp.qdq_conv1x1.default}
WIDE = (torch.float64, torch.int64)
NO_FOLD = {torch.ops.aten._assert_tensor_metadata.default}


@dataclass
class LayerInfo:
    """One quantized layer as lowered: where its weight lives and how it is quantized."""

    layer: str
    kind: str
    node: str                    # name of the fbqc_htp node in the prepared graph
    weight: str                  # buffer (→ ONNX initializer) holding the codes, (K, N) or (O, C, 1, 1)
    zero: str                    # buffer of the explicit all-zero weight zero point
    container: str               # "int4" | "int8"
    x_scale: float
    x_zp: int
    x_bits: int
    y_scale: float
    y_zp: int
    y_bits: int
    shape: list[int]             # output shape
    source: str = ""             # name of the integer layer node in the INTEGER program
    spread: int = 1              # weight codes stored ×spread, scale ÷spread (A16 layers)


@dataclass
class Prepared:
    program: Program
    layers: list[LayerInfo]
    baked_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    cast_inputs: dict[str, str] = field(default_factory=dict)       # name → dtype of the ONNX input
    folded: int = 0


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def symbolic_dims(program: Program) -> dict[str, list[str]]:
    """Placeholders whose shape holds a symbolic dim (HTP graphs are static)."""
    out = {}
    for n in program.graph.nodes:
        v = _val(n)
        if n.op == "placeholder" and isinstance(v, torch.Tensor):
            sym = [str(d) for d in v.shape if not isinstance(d, int)]
            if sym:
                out[n.name] = sym
    return out


def container_of(spec: QuantSpec) -> str:
    return "int4" if spec.weight.container.logical == "int4" else "int8"


def a16_spread(lo: int, hi: int) -> int:
    """The largest power of two ``k`` with ``k·lo ≥ −128`` and ``k·hi ≤ 127``.

    Seen on the HTP simulator: an A16 linear behaves as if its integer accumulator carried an absolute
    error of a few units, so with 4-bit weight codes (−8…7) the outputs are off by up to ~34 LSB of the
    16-bit grid; the same layer with its codes multiplied by 16 (stored int8) and the scale divided by
    16 — the same numbers, exactly — agrees within 1–2 LSB (as W8A16 does).
    """
    k = 1
    while (2 * k) * lo >= -128 and (2 * k) * hi <= 127:
        k *= 2
    return k


def _wide_inputs(program: Program) -> set[str]:
    """Placeholders that some float64/int64 *computation* depends on (beyond index arithmetic)."""
    deps: dict[str, set[str]] = {}
    found: set[str] = set()
    for n in program.graph.nodes:
        if n.op == "placeholder":
            deps[n.name] = {n.name}
            continue
        d = set().union(*(deps.get(a.name, set()) for a in n.all_input_nodes)) if n.all_input_nodes else set()
        deps[n.name] = d
        v = _val(n)
        if n.op == "call_function" and isinstance(v, torch.Tensor) and v.dtype == torch.float64:
            found |= d
    return found


def _bake(program: Program, names: set[str]) -> dict[str, torch.Tensor]:
    baked = {}
    for n in list(program.graph.nodes):
        if n.op == "placeholder" and n.name in names:
            value = program.example_inputs[n.target].clone()
            first = next(m for m in program.graph.nodes if m.op != "placeholder")
            c = program.add_constant(f"htp.baked.{n.target}", value, before=first)
            n.replace_all_uses_with(c)
            baked[n.target] = value
    return baked


def _is_const(n: fx.Node, const: set[fx.Node]) -> bool:
    if n.op == "get_attr":
        return True
    if n.op != "call_function" or n.target in NO_FOLD:
        return False
    if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace != "aten":
        return False
    if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
        return False
    return all(a in const for a in n.all_input_nodes)


def _fold_constants(program: Program) -> int:
    """Evaluate constant subgraphs; replace those with non-constant users by buffers (f64 → f32)."""
    graph, const, env = program.graph, set(), {}
    for n in graph.nodes:
        if _is_const(n, const):
            const.add(n)
    load = lambda a: env[a] if a in env else program.attr(a) if a.op == "get_attr" else a  # noqa: E731
    folded = 0
    for n in list(graph.nodes):
        if n not in const or n.op == "get_attr":
            continue
        args = fx.node.map_arg(n.args, load)
        kwargs = fx.node.map_arg(n.kwargs, load)
        env[n] = n.target(*args, **kwargs)
        boundary = [u for u in n.users if u not in const]
        value = env[n]
        if boundary and isinstance(value, torch.Tensor):
            if value.dtype == torch.float64:
                value = value.to(torch.float32)
            c = program.add_constant(f"htp.folded.{n.name}", value.contiguous(), before=n)
            for u in boundary:
                u.replace_input_with(n, c)
            folded += 1
    graph.eliminate_dead_code()
    return folded


def _cast_integer_inputs(program: Program) -> dict[str, str]:
    casts = {}
    inputs = dict(program.example_inputs)
    for n in program.graph.nodes:
        v = _val(n)
        if n.op == "placeholder" and isinstance(v, torch.Tensor) and v.dtype == torch.int64 and n.users:
            x = inputs[n.target]
            if x.numel() and (x.min() < -2**31 or x.max() >= 2**31):
                raise ValueError(f"input {n.target} holds values outside int32; the HTP has no int64")
            inputs[n.target] = x.to(torch.int32)     # re-export traces the graph with int32
            n.meta["val"] = meta_val(v.shape, torch.int32)
            casts[n.target] = "int32"
    program.example_inputs = inputs
    return casts


def _rewrite_layers(program: Program) -> list[LayerInfo]:
    graph, layers = program.graph, []
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in LAYER_OPS]:
        kind, spec = LAYER_OPS[node.target], node.meta[QUANT]
        xq, sx, zx, wq_n, ws_n, wz_n, b_n, sy, zy, y_bits = node.args
        (dq,) = node.users
        wq, w_scale = program.attr(wq_n), program.attr(ws_n)
        cont, spread = container_of(spec), 1
        if spec.input.bits == 16:          # A16: spread the levels over int8 (see a16_spread)
            cont, spread = "int8", a16_spread(*spec.weight.levels)
        if spread != 1:
            wq = (wq.to(torch.int32) * spread).to(torch.int8)
            w_scale = w_scale / spread                          # a power of two: exact in fp32
            ws_n = program.add_constant(f"htp.{spec.layer}.w_scale_spread", w_scale, before=node)
        stored = wq.t().contiguous() if kind == "linear" else wq
        tag = spec.layer
        w = program.add_constant(f"htp.{tag}.w_{cont}", stored, before=node)
        z = program.add_constant(f"htp.{tag}.wz_{cont}", torch.zeros(wq.shape[0], dtype=torch.int8),
                                 before=node)
        bq = bs = None
        if b_n is not None:
            b_scale = int_ops.acc_scale(sx, w_scale)
            b_int = torch.round(program.attr(b_n).to(torch.float32) / b_scale).clamp(-2**31, 2**31 - 1)
            bq = program.add_constant(f"htp.{tag}.bias_int32", b_int.to(torch.int32), before=node)
            bs = program.add_constant(f"htp.{tag}.bias_scale", b_scale, before=node)
        x, _, _, x_bits = xq.args
        with graph.inserting_before(node):
            new = graph.call_function(QDQ_OPS[kind], (x, w, ws_n, z, b_n, bq, bs, sx, zx, x_bits, sy, zy,
                                                      y_bits))
        new.meta.update({"val": dq.meta["val"], QUANT: spec})
        dq.replace_all_uses_with(new)
        for dead in (dq, node, xq):
            graph.erase_node(dead)
        layers.append(LayerInfo(spec.layer, kind, new.name, w.target, z.target, cont, sx, zx,
                                spec.input.bits, sy, zy, spec.output.bits, list(dq.meta["val"].shape),
                                node.name, spread))
    return layers


def _drop_noop_squeezes(program: Program) -> int:
    """``x.squeeze(d)`` with ``x.shape[d] != 1`` is a no-op in torch but an invalid ONNX ``Squeeze``
    (PixArt-Σ's ``hidden_states.squeeze(1)`` failed ORT's shape inference): keep only size-1 dims."""
    aten, count = torch.ops.aten, 0
    for n in list(program.graph.nodes):
        if n.op != "call_function" or n.target not in (aten.squeeze.dim, aten.squeeze.dims):
            continue
        x = n.args[0]
        shape = x.meta["val"].shape
        dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        keep = [d for d in dims if shape[d % len(shape)] == 1] if shape else []
        if len(keep) == len(dims):
            continue
        if keep:
            n.target, n.args = aten.squeeze.dims, (x, keep)
        else:
            n.replace_all_uses_with(x)
            program.graph.erase_node(n)
        count += 1
    return count


def prepare(program: Program) -> Prepared:
    """A copy of the INTEGER ``program`` ready for :func:`fbqc.backends.htp.lower.to_onnx`."""
    if program.stage != Stage.INTEGER:
        raise ValueError(f"the htp backend takes an INTEGER program, got {program.stage}")
    p = program.copy()
    p.example_inputs = dict(program.example_inputs)
    for n in [n for n in p.graph.nodes if n.target in NO_FOLD]:   # dtype asserts: baking changes dtypes
        p.graph.erase_node(n)
    _drop_noop_squeezes(p)
    baked = _bake(p, _wide_inputs(p))
    layers = _rewrite_layers(p)
    folded = _fold_constants(p)
    casts = _cast_integer_inputs(p)
    p.graph.eliminate_dead_code()
    p.drop_unused_attrs()
    p.recompile()
    return Prepared(p, layers, baked, casts, folded)
