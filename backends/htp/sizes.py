"""Where the bytes of an htp artifact's context binaries go, by kind of tensor.

QNN re-lays every tensor out for the HTP (tiles, padding), so the binary cannot be cut into its
tensors byte for byte. The breakdown counts each initializer of the QDQ model at the size QNN stores it
(measured on single layers, onnxruntime-qnn 2.7.0 / QNN 2.51: int4 weights ½ byte each, int8 1 byte;
float constants in fp16 — an fp32 MatMul weight of 4 M values takes 8.4 MB of binary with
``enable_htp_fp16_precision``); what remains is the graph (op and tensor records, activation
encodings, lookup tables, padding and per-channel parameters laid out for the HTP).
"""
from __future__ import annotations

from typing import Any

import onnx

from .partition import QDQ

#: bytes QNN stores per element, by ONNX data type (floats are stored in fp16)
STORED = {onnx.TensorProto.INT4: 0.5, onnx.TensorProto.UINT4: 0.5, onnx.TensorProto.INT8: 1,
          onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2,
          onnx.TensorProto.INT32: 4, onnx.TensorProto.FLOAT: 2, onnx.TensorProto.FLOAT16: 2,
          onnx.TensorProto.INT64: 8}


def count(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def breakdown(model: onnx.ModelProto, binary_bytes: int, quantized_weights: int) -> dict[str, Any]:
    """Bytes by category (``int4_weights``, ``int8_weights``, ``quant_params``, ``int32_biases``,
    ``float_constants``, ``graph_and_layout``: the rest) and bits per quantized weight."""
    role: dict[str, str] = {}
    for n in model.graph.node:
        for pos, v in enumerate(n.input):
            if not v:
                continue
            if n.op_type in QDQ:
                role.setdefault(v, "data" if pos == 0 else "quant_params")
            else:
                role.setdefault(v, "operand")
    cats = dict.fromkeys(("int4_weights", "int8_weights", "quant_params", "int32_biases", "float_constants",
                          "other_constants"), 0.0)
    float_onnx = 0
    for t in model.graph.initializer:
        n = count(t)
        stored = n * STORED.get(t.data_type, 4)
        r = role.get(t.name, "operand")
        if r == "quant_params":
            cats["quant_params"] += stored
        elif r == "data" and t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            cats["int4_weights"] += stored
        elif r == "data" and t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            cats["int8_weights"] += stored
        elif r == "data" and t.data_type == onnx.TensorProto.INT32:
            cats["int32_biases"] += stored
        elif t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            cats["float_constants"] += stored
            float_onnx += n * (4 if t.data_type == onnx.TensorProto.FLOAT else 2)
        else:
            cats["other_constants"] += stored
    out = {k: int(v) for k, v in cats.items()}
    out["graph_and_layout"] = binary_bytes - sum(out.values())
    return {"binary_bytes": binary_bytes, "bytes": out, "float_constants_in_onnx": float_onnx,
            "quantized_weights": quantized_weights,
            "bits_per_quantized_weight": 8 * binary_bytes / quantized_weights if quantized_weights else None,
            "basis": "initializers counted at the size QNN stores them (int4 ½ byte, floats fp16); "
                     "graph_and_layout is the rest of the binary"}
