"""Rewrites of the exported ONNX graph (``onnx_ir``) so that every node runs on the HTP, correctly.

Each rule names what it fixes; the ones marked *seen* were measured on the HTP simulator
(onnxruntime-qnn 2.7.0, QNN 2.51, SM8750).

- ``fold``: constant folding (shape arithmetic, ``SplitToSequence``/``SequenceAt`` from ``chunk``),
  never folding a ``QuantizeLinear``/``DequantizeLinear`` (that would turn int4 weights into floats).
- ``int4_weights``: weight codes and their explicit zero points of ≤ 4-bit layers become INT4
  initializers (torch has no int4 dtype; they travel as int8).
- ``pad_to_concat`` (*seen*: a constant ``Pad`` with value 1, Sana's linear attention, returns wrong
  numbers on the HTP): a constant-mode ``Pad`` with static pads becomes a ``Concat`` with constants.
- ``norm_affine``: ``LayerNormalization`` / ``RMSNormalization`` get an explicit scale (ones) and bias
  (zeros) when they have none (the HTP rejects LayerNormalization without them).
- ``squeeze_axes``: ``Squeeze``/``Unsqueeze`` with a static axes input keep it as an initializer of the
  right rank (PixArt-Σ's export fails ORT's shape inference otherwise) — see :func:`squeeze_axes`.
- ``square_as_mul`` (*seen*: the HTP compiler fuses ``Pow(x, 2) → ReduceMean → … → Mul → Mul(w)`` into
  an RMS norm that is wrong for inputs like (1, heads, T, d): half the heads came back 0 for SD3's q/k
  RMSNorm; ``Mul(x, x)`` is not fused and is right for every shape tried): ``Pow(x, 2)`` → ``Mul(x, x)``.
- ``wide_compute``: remaining float64/int64 *computation* is reported (it cannot run on the HTP).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

from .partition import QDQ


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                 const_value=ir.tensor(array, name=name))
    graph.register_initializer(v)
    return v


def _value(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    cv = v.const_value if v.const_value is not None else None
    return None if cv is None else cv.numpy()


def fold(model: ir.Model) -> None:
    onnxscript.optimizer.fold_constants(model, should_fold=lambda n: False if n.op_type in QDQ else None)
    RemoveUnusedNodesPass()(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)


def drop_unused_inputs(model: ir.Model) -> list[str]:
    """Graph inputs nothing reads any more (baked inputs) are removed from the graph's signature."""
    unused = [v for v in model.graph.inputs if not v.uses()]
    for v in unused:
        model.graph.inputs.remove(v)
    return [v.name for v in unused]


def int4_weights(model: ir.Model, names: list[str]) -> None:
    """Retype the named int8 initializers (levels within −8…7) to INT4."""
    inits = model.graph.initializers
    for name in names:
        if name not in inits:
            raise RuntimeError(f"weight initializer {name!r} not found in the exported ONNX graph")
        v = inits[name]
        a = v.const_value.numpy()
        if a.size and (a.min() < -8 or a.max() > 7):
            raise RuntimeError(f"{name}: levels {a.min()}…{a.max()} do not fit int4")
        v.const_value = ir.tensor(a.astype(np.int8), dtype=ir.DataType.INT4, name=name)
        v.dtype = ir.DataType.INT4


def pad_to_concat(model: ir.Model) -> int:
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "Pad" or node.attributes.get_string("mode", "constant") != "constant":
            continue
        x, pads = node.inputs[0], _value(node.inputs[1])
        value = _value(node.inputs[2]) if len(node.inputs) > 2 else np.zeros((), np.float32)
        if pads is None or value is None or len(node.inputs) > 3 or x.shape is None \
                or not x.shape.is_static() or (pads < 0).any():
            continue
        rank, cur, shape = len(x.shape), x, list(x.shape)
        dtype = x.dtype.numpy()
        for axis in range(rank):
            before, after = int(pads[axis]), int(pads[axis + rank])
            if not before and not after:
                continue
            parts = []
            for n_pad in (before, None, after):
                if n_pad is None:
                    parts.append(cur)
                elif n_pad:
                    block = np.full([*shape[:axis], n_pad, *shape[axis + 1:]], value, dtype=dtype)
                    parts.append(_const(graph, f"{node.name}_pad{axis}", block))
            cat = ir.node("Concat", parts, attributes={"axis": axis}, name=f"{node.name}_concat{axis}")
            graph.insert_before(node, cat)
            shape[axis] += before + after
            cur = cat.outputs[0]
            cur.shape, cur.dtype = ir.Shape(shape), x.dtype
        node.outputs[0].replace_all_uses_with(cur, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count


def square_as_mul(model: ir.Model) -> int:
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "Pow" or node.domain not in ("", "ai.onnx"):
            continue
        exponent = _value(node.inputs[1])
        if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
            continue
        x = node.inputs[0]
        mul = ir.node("Mul", [x, x], name=f"{node.name}_square")
        graph.insert_before(node, mul)
        mul.outputs[0].shape, mul.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        node.outputs[0].replace_all_uses_with(mul.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count


def norm_affine(model: ir.Model) -> int:
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type not in ("LayerNormalization", "RMSNormalization"):
            continue
        x = node.inputs[0]
        axis = node.attributes.get_int("axis", -1)
        if x.shape is None or not x.shape.is_static():
            continue
        norm_shape = list(x.shape)[axis:]
        dtype = x.dtype.numpy()
        want = 3 if node.op_type == "LayerNormalization" else 2
        if len(node.inputs) < want:
            node.resize_inputs(want)
        changed = False
        if node.inputs[1] is None:
            node.replace_input_with(1, _const(graph, f"{node.name}_scale", np.ones(norm_shape, dtype)))
            changed = True
        if want == 3 and node.inputs[2] is None:
            node.replace_input_with(2, _const(graph, f"{node.name}_bias", np.zeros(norm_shape, dtype)))
            changed = True
        count += changed
    return count


def wide_compute(model: ir.Model) -> list[tuple[str, str, str]]:
    """Nodes computing in float64/int64 on non-constant data: (node, op, dtype)."""
    bad = []
    for node in model.graph:
        for out in node.outputs:
            if out.dtype in (ir.DataType.DOUBLE, ir.DataType.INT64) and node.op_type not in ("Shape", "Size"):
                bad.append((node.name, node.op_type, out.dtype.name))
                break
    return bad
