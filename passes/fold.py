"""Fold: fake-quantized weights become integer constants + per-channel scales (FOLDED stage)."""
from __future__ import annotations

import torch

from fbqc.fx_utils import arg
from fbqc.ops.fake_quant import weight_codes
from fbqc.pass_infra import Pass, PassError, PassResult
from fbqc.program import Program
from fbqc.spec import LAYER, QUANT, ROLE, QuantSpec
from fbqc.stage import Stage

fbqc = torch.ops.fbqc


class Fold(Pass):
    """Replace fake_quant_weight(W) by dequantize_weight(Wq, S, z) with Wq in the smallest container.

    Bit-width ownership (:mod:`fbqc.spec`): during FAKE_QUANT the layer's bits buffers own its
    bit-widths (after QAT: the schedule's last values); this pass writes all of them — weight
    (``<layer>.w_bits``), input (``.in_bits``) and output (``.out_bits``) — into the spec, which is the
    only owner from FOLDED on (the activation buffers left in the FOLDED graph must equal it: the
    FOLDED verifier checks). 4-bit levels live in int8 (packing is the backends' business).
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
            spec = self._bits_into_spec(program, node, spec, bits_node)
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

    def _bits_into_spec(self, program: Program, node, spec: QuantSpec, w_bits) -> QuantSpec:
        """``spec`` with the bit-widths its buffers hold (weight, input, output)."""
        fq_in, (fq_out,) = arg(node, 0, "input"), node.users      # FAKE_QUANT verifier: one of each
        bufs = {"weight": w_bits, "input": fq_in.args[3], "output": fq_out.args[3]}
        values = {k: float(program.attr(b)) for k, b in bufs.items()}
        try:
            return spec.with_bits(values["weight"], input=values["input"], output=values["output"])
        except ValueError as e:
            role = next((k for k in ("input", "output") if values[k] not in (8, 16)), "weight")
            raise PassError(self.name, f"layer {spec.layer}: its {role} bits buffer {bufs[role].target} "
                                       f"holds {values[role]:g}: {e}") from None
