"""InsertFakeQuant: the one generic pass that turns QuantSpecs into fbqc::fake_quant_* nodes."""
from __future__ import annotations

import torch

from fbqc.fx_utils import arg, meta_val
from fbqc.pass_infra import Pass, PassResult
from fbqc.program import Program
from fbqc.spec import LAYER, QUANT, ROLE, QuantSpec
from fbqc.stage import Stage

fbqc = torch.ops.fbqc

#: value of an activation scale before calibration (a forward pass then yields NaN, loudly)
UNCALIBRATED = float("nan")


def _scalar(v: float, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(v, dtype=dtype)


class InsertFakeQuant(Pass):
    """Insert fake_quant_weight on each annotated weight and fake_quant_act on its input and output.

    Bit-widths, scales and zero points are 0-d buffers read by the ops (``<layer>.w_bits`` float64,
    ``<layer>.in_bits`` / ``.out_bits``, scales and zero points float32), so QAT and calibration change
    them without touching the graph. Activation scales start uncalibrated (NaN).

    Bit-width ownership (:mod:`fbqc.spec`): this pass hands every bit-width over from the spec to its
    buffer. During FAKE_QUANT the buffers own the bit-widths, weights and activations alike (what the
    QAT schedule writes); Fold writes them all back into the spec, which owns them from FOLDED on.
    """

    requires = Stage.ANNOTATED
    produces = Stage.FAKE_QUANT

    def run(self, program: Program) -> PassResult:
        graph = program.graph
        for node in program.quantized_nodes():
            spec: QuantSpec = node.meta[QUANT]
            x, w = arg(node, 0, "input"), arg(node, 1, "weight")

            bits = program.add_constant(f"{spec.layer}.w_bits", _scalar(spec.weight.bits, torch.float64),
                                        before=node)   # float64: 3.1 bits stays 3.1
            with graph.inserting_before(node):
                wq = graph.call_function(fbqc.fake_quant_weight.default,
                                         (w, bits, spec.weight.axis, spec.weight.scheme))
            wq.meta.update({"val": w.meta.get("val", meta_val(program.attr(w).shape, torch.float32)),
                            ROLE: "weight", LAYER: spec.layer})
            node.replace_input_with(w, wq)

            xq = self._act(program, node, x, f"{spec.layer}.in", spec.input.bits, "input")
            node.replace_input_with(x, xq)

            users = list(node.users)
            yq = self._act(program, node.next, node, f"{spec.layer}.out", spec.output.bits, "output")
            for u in users:
                u.replace_input_with(node, yq)
        return PassResult(program, True)

    @staticmethod
    def _act(program: Program, before, value, name: str, bits: int, role: str):
        consts = [program.add_constant(f"{name}_{k}", _scalar(v), before=before)
                  for k, v in (("scale", UNCALIBRATED), ("zero_point", 0.0), ("bits", float(bits)))]
        with program.graph.inserting_before(before):
            q = program.graph.call_function(fbqc.fake_quant_act.default, (value, *consts))
        q.meta.update({"val": value.meta["val"], ROLE: role, LAYER: name.rsplit(".", 1)[0]})
        return q


def bits_buffers(program: Program) -> dict[str, torch.Tensor]:
    """``{layer: its 0-d weight-bits buffer}`` in graph order (the ``<layer>.w_bits`` constants that
    :class:`InsertFakeQuant` gives each ``fake_quant_weight``; QAT's schedule writes them)."""
    out = {}
    for n in program.graph.nodes:
        if n.op == "call_function" and n.target == fbqc.fake_quant_weight.default:
            out[n.meta[LAYER]] = program.attr(n.args[1])
    return out
