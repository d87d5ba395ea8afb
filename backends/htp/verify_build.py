"""Verification builds derived from the artifact's QDQ ONNX (compiled for the HTP like the model).

- :func:`layer_model`: every quantized layer side by side, each fed its *input codes* as a graph input
  (uint8, or uint16 for A16) and returning its *output codes*: the teacher-forced per-layer check of
  DESIGN.md §3 (the reference's own input codes go in; the HTP's requantized codes come out).
- :func:`with_layer_outputs`: the whole model with each layer's dequantized output as an extra graph
  output (free-running: the HTP's own fp16 float ops in between), read back as codes.
"""
from __future__ import annotations

import onnx_ir as ir

SHAPE_OPS = ("Gemm", "Conv")


def _core(model: ir.Model, layer: str) -> ir.Node:
    for op in SHAPE_OPS:
        for node in model.graph:
            if node.name == f"{layer}/{op}_0":
                return node
    raise KeyError(f"layer {layer}: no {' or '.join(SHAPE_OPS)} node named {layer}/<op>_0 in the QDQ model")


def _consumer(value: ir.Value, op_type: str) -> ir.Node:
    users = [u.node for u in value.uses() if u.node.op_type == op_type]
    if len(users) != 1:
        raise KeyError(f"value {value.name}: expected one {op_type} consumer, found {len(users)}")
    return users[0]


def output_dq(model: ir.Model, layer: str) -> ir.Node:
    """The DequantizeLinear reading a layer's output codes (its output is the layer's float output)."""
    q = _consumer(_core(model, layer).outputs[0], "QuantizeLinear")
    return _consumer(q.outputs[0], "DequantizeLinear")


def _copy_init(graph: ir.Graph, v: ir.Value | None) -> ir.Value | None:
    if v is None:
        return None
    if v.name in graph.initializers:
        return graph.initializers[v.name]
    if v.const_value is None:
        raise ValueError(f"{v.name} is not a constant")
    new = ir.Value(name=v.name, shape=v.shape, type=v.type, const_value=v.const_value)
    graph.register_initializer(new)
    return new


def _clone(graph: ir.Graph, node: ir.Node, inputs: list[ir.Value | None], name: str) -> ir.Value:
    new = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()), name=name,
                  version=node.version)
    graph.append(new)
    new.outputs[0].name = f"{name}:out"
    return new.outputs[0]


def layer_model(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> ir.Model:
    """Layers ``shapes`` (name → input code shape, 2-D for Gemm, NCHW for Conv) as one parallel graph.

    Inputs ``<layer>:x`` (codes), outputs ``<layer>:y`` (codes); weights, scales and zero points are
    the QDQ model's initializers (shared tensors, not copies).
    """
    graph = ir.Graph([], [], nodes=[], opset_imports=dict(model.opset_imports), name="fbqc_layers")
    for layer, shape in shapes.items():
        core = _core(model, layer)
        in_dq = core.inputs[0].producer()
        w_dq = core.inputs[1].producer()
        b_dq = core.inputs[2].producer() if len(core.inputs) > 2 and core.inputs[2] is not None else None
        out_q = _consumer(core.outputs[0], "QuantizeLinear")
        x_zp = in_dq.inputs[2]
        x = ir.Value(name=f"{layer}:x", shape=ir.Shape(list(shape)), type=ir.TensorType(x_zp.dtype))
        graph.inputs.append(x)
        init = lambda v: _copy_init(graph, v)  # noqa: E731
        xd = _clone(graph, in_dq, [x, init(in_dq.inputs[1]), init(x_zp)], f"{layer}/x_dq")
        wd = _clone(graph, w_dq, [init(v) for v in w_dq.inputs], f"{layer}/w_dq")
        args = [xd, wd]
        if b_dq is not None:
            args.append(_clone(graph, b_dq, [init(v) for v in b_dq.inputs], f"{layer}/b_dq"))
        y = _clone(graph, core, args, f"{layer}/{core.op_type}")
        yq = _clone(graph, out_q, [y, init(out_q.inputs[1]), init(out_q.inputs[2])], f"{layer}/y_q")
        yq.name = f"{layer}:y"
        graph.outputs.append(yq)
    return ir.Model(graph, ir_version=model.ir_version, producer_name="fbqc")


def with_layer_outputs(model: ir.Model, layers: list[str]) -> tuple[ir.Model, dict[str, str]]:
    """``model`` (modified in place) with each layer's dequantized output as a graph output."""
    names = {}
    for layer in layers:
        out = output_dq(model, layer).outputs[0]
        if out not in model.graph.outputs:
            model.graph.outputs.append(out)
        names[layer] = out.name
    return model, names
