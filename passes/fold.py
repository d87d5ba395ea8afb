"""Fold: fake-quantized weights become integer constants + per-channel scales (FOLDED stage)."""
from __future__ import annotations

from dataclasses import replace

import torch

from fbqc.fake_quant import weight_codes
from fbqc.fx_utils import arg
from fbqc.pass_infra import Pass, PassError, PassResult
from fbqc.program import Program
from fbqc.spec import LAYER, QUANT, ROLE
from fbqc.stage import Stage

fbqc = torch.ops.fbqc


class Fold(Pass):
    """Replace fake_quant_weight(W) by dequantize_weight(Wq, S, z) with Wq in the smallest container.

    The bit-width is read from the layer's bits buffer (after QAT: the schedule's last value) and
    written back into the spec. 4-bit levels live in int8 (packing is the backends' business).
    """

    requires = Stage.FAKE_QUANT
    produces = Stage.FOLDED

    def run(self, program: Program) -> PassResult:
        graph = program.graph
        for node in program.quantized_nodes():
            spec = node.meta[QUANT]
            fq = arg(node, 1, "weight")
            w_node, bits_node, axis, scheme = fq.args
            w = program.attr(w_node)
            if not bool(torch.isfinite(w).all()):
                raise PassError(self.name, f"parameter {w_node.target} of layer {spec.layer} contains "
                                           f"NaN or Inf")
            bits = float(program.attr(bits_node))
            spec = replace(spec, weight=replace(spec.weight, bits=bits))
            node.meta[QUANT] = spec
            q, scale, zp = weight_codes(w, program.attr(bits_node), axis, scheme)
            wq = program.add_constant(f"{spec.layer}.wq", q.to(spec.weight.container.dtype), before=fq)
            s = program.add_constant(f"{spec.layer}.w_scale", scale, before=fq)
            z = (program.add_constant(f"{spec.layer}.w_zero_point", zp.to(torch.int32), before=fq)
                 if scheme == "wide" else None)
            with graph.inserting_before(fq):
                dq = graph.call_function(fbqc.dequantize_weight.default, (wq, s, z))
            dq.meta.update({"val": fq.meta["val"], ROLE: "weight", LAYER: spec.layer})
            fq.replace_all_uses_with(dq)
            graph.erase_node(fq)
        graph.eliminate_dead_code()
        program.drop_unused_attrs()
        return PassResult(program, True)
