"""htp backend, end to end: the four tiny architectures compiled to QNN HTP context binaries for SM8750
with no CPU node, run on the HTP simulator and checked against the cpu reference (DESIGN.md §3, §4)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import ARCHS
from fbqc.artifact import read_manifest
from fbqc.backends.cpu import CpuBackend
from fbqc.errors import UserError
from fbqc.artifact_verify import verify_artifact

HTP_FILES = {"model_ctx.onnx", "model_ctx_qnn.bin", "model.qdq.onnx", "saver_output.c", "params.bin",
             "placement.json", "program.pt2", "io.pt"}


def htp(compiled, arch, bits=4.0, **kw):
    return compiled(arch, bits, target="htp", **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_to_context_binary_with_no_cpu_node(compiled, arch):
    out, result = htp(compiled, arch)
    m = read_manifest(out)
    assert HTP_FILES <= set(m["files"])
    b = m["backend"]
    assert (b["soc"], b["soc_model"], b["htp_arch"]) == ("SM8750", 69, 79)
    assert b["session"]["session.disable_cpu_ep_fallback"] == "1"
    placement = json.loads((out / "placement.json").read_text())
    assert placement["cpu_nodes"] == 0 and placement["nodes"] > 50
    assert {r["ep"] for r in placement["rows"]} == {"QNNExecutionProvider"}
    assert placement["qnn_ops"].get("FullyConnected", 0) >= 1
    # the EPContext model is nothing but the HTP context
    ctx = onnx.load(str(out / "model_ctx.onnx"), load_external_data=False)
    assert {n.op_type for n in ctx.graph.node} == {"EPContext"}
    assert (out / "model_ctx_qnn.bin").stat().st_size > 10_000
    assert "graphCreate" in (out / "saver_output.c").read_text()
    # static shapes stated in the manifest are the example inputs' shapes
    for name, meta in b["inputs"].items():
        assert meta["shape"] == m["inputs"][name]["shape"]


@pytest.mark.parametrize("arch", ARCHS)
def test_simulator_agrees_with_cpu_reference(compiled, arch):
    out, _ = htp(compiled, arch)
    report = verify_artifact(out)
    s = report["summary"]
    assert s["layers"] == s["a8_layers"] > 0 and s["a16_layers"] == 0
    # teacher-forced: the goal of the issue, ≥ 99.9 % within 1 LSB (measured: 100 %, max 1 LSB)
    assert s["a8_within_1lsb"] >= 0.999 and s["a8_max_lsb"] <= 2, s
    assert s["a8_exact"] > 0.9 and s["passed"] and s["exact"]
    assert report["seconds"]["cpu_nodes"] == 0
    # free running (fp16 float ops on the HTP in between): close, not exact
    assert report["free_running"]["summary"]["a8_within_1lsb"] > 0.95
    # end to end the context binary's output is the cpu reference's within fp16 drift
    e2e = report["end_to_end_vs_cpu"][0]
    assert 0 < e2e["rel_error"] < 0.05, e2e


@pytest.mark.parametrize("arch", ARCHS)
def test_qdq_graph_has_int4_per_channel_weights_feeding_gemm(compiled, arch):
    """Checked with plain onnx against the cpu reference's integer weights (not through our lowering)."""
    out, result = htp(compiled, arch)
    model = onnx.load(str(out / "model.qdq.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    ref = CpuBackend().load(out)
    for layer, node in ref.layers().items():
        kind = {r["layer"]: r["kind"] for r in result["manifest"]["layers"]}[layer]
        core = by_name[f"{layer}/{'Gemm' if kind == 'linear' else 'Conv'}_0"]
        dq = producer[core.input[1]]
        assert dq.op_type == "DequantizeLinear"
        axis = {a.name: a.i for a in dq.attribute}["axis"]
        w, scale, zero = (inits[i] for i in dq.input)
        assert w.data_type == zero.data_type == onnx.TensorProto.INT4
        assert not numpy_helper.to_array(zero).any() and len(zero.dims) == 1
        codes = ref.constants(node)[3]
        want = codes.t().numpy() if kind == "linear" else codes.numpy()
        assert axis == (1 if kind == "linear" else 0)
        np.testing.assert_array_equal(numpy_helper.to_array(w).astype(np.int8), want)
        np.testing.assert_array_equal(numpy_helper.to_array(scale), ref.constants(node)[4].numpy())
        x_q = producer[core.input[0]]
        assert numpy_helper.to_array(inits[x_q.input[2]]).dtype == np.uint8
    # no op computes in float64 / int64 (int64 only in constant shape initializers)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    wide = [n.name for n in inferred.graph.node for o in n.output
            if types.get(o) in (onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64)]
    assert wide == [] and len(types) > 50


def test_flux_rope_folded_and_ids_baked(compiled):
    out, result = htp(compiled, "flux_schnell")
    b = result["manifest"]["backend"]
    assert set(b["baked_inputs"]) == {"img_ids", "txt_ids"} and "img_ids" not in b["inputs"]
    art = result_loader(out)
    from fbqc.artifact import load_io

    inputs = dict(load_io(out)["inputs"])
    art.run(inputs)
    inputs["img_ids"] = inputs["img_ids"] + 1
    with pytest.raises(UserError, match="img_ids.*baked"):
        art.run(inputs)


def test_pixart_int64_timestep_becomes_int32(compiled):
    out, result = htp(compiled, "pixart_sigma")
    b = result["manifest"]["backend"]
    assert b["cast_inputs"] == {"timestep": "int32", "encoder_attention_mask": "int32"}   # no int64 on the HTP
    assert b["inputs"]["timestep"]["dtype"] == "int32"
    from fbqc.artifact import load_io

    inputs = load_io(out)["inputs"]
    assert inputs["timestep"].dtype == torch.int64
    a = result_loader(out).run(inputs)[0]
    b2 = result_loader(out).run({**inputs, "timestep": inputs["timestep"] + 0})[0]
    assert torch.equal(a, b2)
    with pytest.raises(UserError, match="static"):
        result_loader(out).run({**inputs, "hidden_states": inputs["hidden_states"][:, :, :8]})


def result_loader(out):
    from fbqc.backends.htp import HtpBackend

    return HtpBackend().load(out)
