"""The schedule needs no recompilation: torch.compile of the student compiles once for 8 → … → 4 bits."""
from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fbqc
import fbqc.qat
from fbqc.passes import AnnotateLinears, InsertFakeQuant
from fbqc.qat import Schedule, bits_buffers, set_bits, training_view
from fbqc.qat.students.program import FUSED
from test_qat_toy import one_thread, toy_file


def test_bit_changes_compile_once_forward_and_backward(tmp_path):
    with one_thread():
        teacher, mf = fbqc.export_model_file(toy_file(tmp_path))
    student = fbqc.PassManager([AnnotateLinears(4), InsertFakeQuant()])(teacher)
    view = training_view(student, "dynamic")
    buffers = bits_buffers(student)
    counter = CompileCounterWithBackend("aot_eager")            # counts graphs dynamo hands to a backend
    compiled = torch.compile(view.graph_module, backend=counter)
    x = mf.call("example_inputs")
    outs = []
    torch._dynamo.reset()
    with one_thread():
        for bits in [b for *_, b in Schedule.parse("fractional", 250).boundaries()]:   # 8 → 7 → … → 4
            set_bits(buffers, buffers, bits)
            out = compiled(**x)[0]
            out.sum().backward()                                    # the backward graph too
            with torch.no_grad():
                eager = view.graph_module(**x)[0]
            assert torch.equal(out.detach(), eager), bits           # the compiled graph reads the buffer
            outs.append(out.detach())
            if len(outs) == 1:
                first = counter.frame_count
    # no recompilation after the first bit-width, and one graph holds the whole model (the other frame
    # dynamo reports is an empty one from the module's input-flattening wrapper)
    assert counter.frame_count == first, f"recompiled: {first} → {counter.frame_count} frames"
    graphs = [g for g in counter.graphs if len(g.graph.nodes)]
    assert len(graphs) == 1
    # the fused fake quant (fbqc.ops.fused) is traced, not called opaquely: one autograd HOP per quantizer
    n_fq = sum(str(n.target) == "autograd_function_apply" for n in graphs[0].graph.nodes)
    assert n_fq == sum(n.target in FUSED.values() for n in view.graph.nodes) and len(buffers) == 4
    assert not any("fake_quant" in str(n.target) for n in graphs[0].graph.nodes)
    assert len(outs) == 9
    with torch.no_grad():
        errs = [float((o - teacher.graph_module(**x)[0]).pow(2).mean()) for o in outs]
    assert errs[-1] > errs[0] and all(not torch.equal(a, b) for a, b in zip(outs, outs[1:]))
