"""What the htp backend can take, node by node, and why not (``HtpBackend.supports``).

Static rules on the INTEGER graph (no compile needed):
- static shapes: an input with a symbolic dim cannot become an HTP graph;
- weights symmetric (zero point 0) and at most 8 bits (int4 or int8 containers);
- every integer layer reads codes from its own ``fbqc::quantize`` and feeds one ``fbqc::dequantize``
  (the QDQ pattern); ``fbqc`` ops must be INTEGER-stage ops.
Then the QNN EP itself decides for every lowered node (:func:`ep_rows`): a placement probe with the
CPU fallback allowed names each ONNX node the HTP would not take, mapped back to its graph node.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fbqc.program import Program
from fbqc.spec import QUANT
from fbqc.stage import Stage
from fbqc.stage_contract import FBQC_OPS_AT

from ..base import NodeSupport, SupportReport
from .prepare import LAYER_OPS, symbolic_dims

fbqc = torch.ops.fbqc
MAX_WEIGHT_BITS = 8


def _layer_reason(n: fx.Node) -> str:
    spec = n.meta.get(QUANT)
    xq, w_zp = n.args[0], n.args[5]
    if w_zp is not None:
        return ("asymmetric (wide-range) weights with zero points; HTP weights are symmetric "
                "(zero point 0): compile with --scheme narrow")
    if spec is not None and spec.weight.bits > MAX_WEIGHT_BITS:
        return (f"{spec.weight.bits:g}-bit weights; the HTP lowering takes int4/int8 weights "
                f"(at most {MAX_WEIGHT_BITS} bits)")
    if not (isinstance(xq, fx.Node) and xq.target == fbqc.quantize.default and len(xq.users) == 1):
        return "input codes do not come from its own fbqc::quantize (QDQ pattern expected)"
    users = list(n.users)
    if len(users) != 1 or users[0].target != fbqc.dequantize.default:
        return "output codes must feed exactly one fbqc::dequantize (QDQ pattern expected)"
    return ""


def _node_reason(n: fx.Node, sym: dict[str, list[str]]) -> str:
    if n.op == "placeholder":
        if n.name in sym:
            return (f"input {n.target} has dynamic dim(s) {', '.join(sym[n.name])}; HTP graphs are static "
                    f"(drop dynamic_shapes() from the model file for --target htp)")
        return ""
    if n.target in LAYER_OPS:
        return _layer_reason(n)
    if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fbqc":
        if n.target not in FBQC_OPS_AT[Stage.INTEGER]:
            return f"{n.target} is not an INTEGER-stage op (run Fold and LowerToInteger first)"
        if n.target == fbqc.quantize.default and not any(u.target in LAYER_OPS for u in n.users):
            return "fbqc::quantize whose codes feed no integer layer"
        if n.target == fbqc.dequantize.default and getattr(n.args[0], "target", None) not in LAYER_OPS:
            return "fbqc::dequantize of codes that no integer layer produced"
    return ""


def static_report(program: Program, backend: str = "htp") -> SupportReport:
    report = SupportReport(backend)
    if program.stage != Stage.INTEGER:
        report.nodes.append(NodeSupport("<program>", str(program.stage), False,
                                        f"the htp backend takes an INTEGER program, got {program.stage}"))
        return report
    sym = symbolic_dims(program)
    for n in program.graph.nodes:
        if n.op not in ("placeholder", "call_function") or n.target is operator.getitem:
            continue
        reason = _node_reason(n, sym)
        report.nodes.append(NodeSupport(n.name, str(n.target), not reason, reason))
    return report


def add_ep_rows(report: SupportReport, rows: list[dict[str, str]], origin: dict[str, str],
                layers: dict[str, str], soc_name: str) -> SupportReport:
    """Mark the graph nodes whose ONNX nodes the QNN EP left off the HTP (``rows``: off-HTP nodes)."""
    reasons: dict[str, list[str]] = {}
    for r in rows:
        src = origin.get(r["node"], "")
        src = layers.get(src, src)                # a layer name → its integer node
        reasons.setdefault(src or f"<onnx:{r['node']}>", []).append(f"{r['op']} ({r['node']})")
    by_name = {ns.node: i for i, ns in enumerate(report.nodes)}
    for src, ops in reasons.items():
        reason = f"lowers to ONNX {', '.join(ops)}, which the QNN HTP EP ({soc_name}) does not take"
        if src in by_name:
            old = report.nodes[by_name[src]]
            report.nodes[by_name[src]] = NodeSupport(old.node, old.op, False, reason)
        else:
            report.nodes.append(NodeSupport(src, "onnx", False, reason))
    return report
