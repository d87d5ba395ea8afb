"""INTEGER program → QDQ ONNX (opset 21): prepare in torch, export with onnxscript translations, fix up.

``torch.onnx.export(dynamo=True, custom_translation_table=…)`` translates the float ATen ops with the
exporter's own table and the ``fbqc_htp`` layer ops with :mod:`.translate`; the exporter's generic
optimizer is off (it would constant-fold the int4 weight ``DequantizeLinear`` into float weights) and
:mod:`.onnx_fixes` runs instead. The result passes ``onnx.checker`` (full check, with shape inference).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_ir as ir
import torch

from fbqc.program import Program

from . import onnx_fixes
from .prepare import LayerInfo, Prepared, prepare
from .translate import translations

OPSET = 21


@dataclass
class Lowered:
    model: ir.Model
    prepared: Prepared
    fixes: dict[str, int] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)     # ONNX node name → fx node / layer name
    seconds: float = 0.0                                      # time the lowering took

    @property
    def layers(self) -> list[LayerInfo]:
        return self.prepared.layers

    def proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.model)


def _quiet():
    """The exporter logs and warns a lot (torchvision missing, …); keep the terminal clean."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    for name in ("torch.onnx", "torch.export", "onnxscript"):
        lg = logging.getLogger(name)
        old = lg.level
        lg.setLevel(logging.ERROR)
        stack.callback(lg.setLevel, old)
    return stack


def export_onnx(prepared: Prepared) -> ir.Model:
    p = prepared.program
    with _quiet():
        ep = torch.export.export(p.graph_module, (), p.example_inputs, strict=False)
        onx = torch.onnx.export(ep, dynamo=True, opset_version=OPSET, optimize=False,
                                custom_translation_table=translations(), verbose=False)
    return onx.model


def _fx_name(node: ir.Node) -> str:
    text = node.metadata_props.get("pkg.torch.onnx.fx_node", "")
    return text.split(" ", 1)[0].lstrip("%") if text.startswith("%") else ""


def _name_layer_nodes(model: ir.Model, layers: list[LayerInfo]) -> dict[str, str]:
    """Nodes of each layer get names ``<layer>/<Op>_<i>`` (profiles and errors then name the layer).

    A layer's nodes are those translated from the same fx node as the DequantizeLinear that reads its
    weight initializer (fx node names change when the prepared program is re-exported). Returns
    ``{onnx node name: fx node name}`` for every node (the origin of each ONNX node).
    """
    by_weight = {li.weight: li.layer for li in layers}
    fx_to_layer = {}
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0] is not None \
                and node.inputs[0].name in by_weight:
            fx_to_layer[_fx_name(node)] = by_weight[node.inputs[0].name]
    missing = set(by_weight.values()) - set(fx_to_layer.values())
    if missing:
        raise RuntimeError(f"weights of layer(s) {', '.join(sorted(missing))} not found in the ONNX graph")
    counts: dict[str, int] = {}
    origin = {}
    for node in model.graph:
        fx_name = _fx_name(node)
        if fx_name in fx_to_layer:
            key = f"{fx_to_layer[fx_name]}/{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
            node.name = f"{key}_{counts[key] - 1}"
            fx_name = fx_to_layer[fx_name]
        origin[node.name] = fx_name
    return origin


def strip_metadata(model: ir.Model) -> None:
    """Stack traces and class paths hold local file paths: drop them (byte-identical artifacts)."""
    for node in model.graph:
        node.metadata_props.clear()
    model.graph.metadata_props.clear()
    model.metadata_props.clear()
    model.producer_name, model.producer_version = "fbqc", None


def lower(program: Program) -> Lowered:
    """Prepare, export and fix up; raises ``RuntimeError`` naming the step that failed."""
    prepared = prepare(program)
    model = export_onnx(prepared)
    origin = _name_layer_nodes(model, prepared.layers)
    fixes: dict[str, int] = {}
    onnx_fixes.fold(model)
    fixes["pad_to_concat"] = onnx_fixes.pad_to_concat(model)
    fixes["norm_affine"] = onnx_fixes.norm_affine(model)
    fixes["square_as_mul"] = onnx_fixes.square_as_mul(model)
    onnx_fixes.int4_weights(model, [n for li in prepared.layers if li.container == "int4"
                                    for n in (li.weight, li.zero)])
    onnx_fixes.fold(model)
    fixes["unused_inputs_dropped"] = len(onnx_fixes.drop_unused_inputs(model))   # baked ones included
    strip_metadata(model)
    return Lowered(model, prepared, fixes, origin)


def check(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.checker`` (full check) and strict shape inference; returns the inferred model."""
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def describe_inputs(lowered: Lowered) -> dict[str, Any]:
    return {v.name: {"shape": list(v.shape), "dtype": v.dtype.name.lower()} for v in lowered.model.graph.inputs}
