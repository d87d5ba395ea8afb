"""LowerToInteger: quantize → fbqc::qlinear / qconv2d_1x1 → dequantize (INTEGER stage)."""
from __future__ import annotations

import torch

from fbqc.fx_utils import arg, meta_val
from fbqc.pass_infra import Pass, PassResult
from fbqc.program import Program
from fbqc.spec import LAYER, QUANT, ROLE, SPEC_KEY
from fbqc.stage import Stage

fbqc = torch.ops.fbqc
INT_OP = {"linear": fbqc.qlinear.default, "conv1x1": fbqc.qconv2d_1x1.default}


class LowerToInteger(Pass):
    """Rewrite each fake-quant layer into integer ops with fixed activation scales and zero points.

    Per-channel weight scales become a flat float32 vector; the output is requantized (uint8, or
    uint16 held in int32 for A16 layers) because the HTP rejects quantized linears with float output.
    """

    requires = Stage.FOLDED
    produces = Stage.INTEGER

    def run(self, program: Program) -> PassResult:
        graph = program.graph
        for node in program.quantized_nodes():
            spec = node.meta[QUANT]
            fq_in, dq_w = arg(node, 0, "input"), arg(node, 1, "weight")
            bias = arg(node, 2, "bias")
            (fq_out,) = node.users
            x = fq_in.args[0]
            sx, zx = (float(program.attr(a)) for a in fq_in.args[1:3])
            sy, zy = (float(program.attr(a)) for a in fq_out.args[1:3])
            x_bits, y_bits = float(spec.input.bits), float(spec.output.bits)   # the spec owns them (Fold)
            wq, w_scale, w_zp = dq_w.args
            ws = program.add_constant(f"{spec.layer}.w_scale_c", program.attr(w_scale).reshape(-1).clone(),
                                      before=node)

            out_val = fq_out.meta["val"]
            with graph.inserting_before(node):
                xq = graph.call_function(fbqc.quantize.default, (x, sx, int(zx), x_bits))
                yq = graph.call_function(INT_OP[spec.kind], (xq, sx, int(zx), wq, ws, w_zp, bias, sy,
                                                             int(zy), y_bits))
                y = graph.call_function(fbqc.dequantize.default, (yq, sy, int(zy)))
            xq.meta.update({"val": meta_val(x.meta["val"].shape, spec.input.container.dtype), ROLE: "input",
                            LAYER: spec.layer})
            yq.meta.update({"val": meta_val(out_val.shape, spec.output.container.dtype), QUANT: spec,
                            "custom": {SPEC_KEY: spec.to_dict()}})  # survives torch.export.save
            y.meta.update({"val": out_val, ROLE: "output", LAYER: spec.layer})
            fq_out.replace_all_uses_with(y)
            for dead in (fq_out, node, dq_w, fq_in):
                graph.erase_node(dead)
        graph.eliminate_dead_code()
        program.drop_unused_attrs()
        return PassResult(program, True)
