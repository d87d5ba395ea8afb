"""htp compile: a model split into several QNN contexts (``--contexts N``: clean cuts, parallel preparation
in child processes, one EPContext model chaining them, the same numbers as one context) and the
binary's bytes by kind."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from fbqc.artifact import load_io, read_manifest
from fbqc.backends.htp import partition
from fbqc.backends.htp.runner import HtpArtifact
from fbqc.errors import ArtifactError
from fbqc.artifact_verify import verify_artifact

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _inferred(out):
    return onnx.shape_inference.infer_shapes(onnx.load(str(out / "model.qdq.onnx")))


@pytest.mark.parametrize("parts", [2, 3])
def test_cuts_are_clean_balanced_and_the_parts_cover_the_graph(compiled, parts):
    out, _ = compiled("sana", 4.0, target="htp")
    model = _inferred(out)
    cuts = partition.plan(model, parts)
    assert len(cuts) == parts - 1 and cuts == sorted(set(cuts))
    pieces = partition.split(model, cuts)
    nodes = list(model.graph.node)
    assert sum(len(p.graph.node) for p in pieces) == len(nodes)
    producer = {o: n for n in nodes for o in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    for p in pieces:
        onnx.checker.check_model(p, full_check=True)
        for v in p.graph.input:           # never inside a Q/DQ unit: crossings come from ordinary ops
            assert v.name in graph_inputs or producer[v.name].op_type not in partition.QDQ, v.name
    sizes = [sum(len(t.raw_data) for t in p.graph.initializer) for p in pieces]
    assert min(sizes) > 0.2 * sum(sizes) / parts, sizes


@pytest.mark.parametrize("kw", [{}, {"a16": (".*",), "exclude": ("timestep_embedder",)}], ids=["W4A8", "A16"])
def test_two_contexts_run_as_one_model_with_the_numbers_of_one(compiled, kw):
    """``--a16 '.*'`` quantizes the timestep embedding's adaLN linear too: its dequantized output (read by
    every block's float ops) crosses the cut; a DQ feeding a quantized op may not."""
    one, _ = compiled("sana", 4.0, target="htp", **kw)
    two, result = compiled("sana", 4.0, target="htp", contexts=2, **kw)
    m = read_manifest(two)
    b = m["backend"]
    assert b["contexts"] == 2 and isinstance(b["context_binary"], list) and len(b["context_binary"]) == 2
    assert [e["file"] for e in b["context_binary"]] == ["model_ctx_p0_qnn.bin", "model_ctx_p1_qnn.bin"]
    assert b["placement"]["cpu_nodes"] == 0
    assert b["placement"]["nodes"] == read_manifest(one)["backend"]["placement"]["nodes"]
    sizes = [e["bytes"] for e in b["context_binary"]]
    assert min(sizes) > 0.2 * max(sizes), sizes             # the weights are shared out, not all in one
    model = _inferred(two)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    crossing = [producer.get(v.name) for v in partition.split(model, partition.plan(model, 2))[1].graph.input]
    assert ("DequantizeLinear" in crossing) == bool(kw) and "QuantizeLinear" not in crossing
    ctx = onnx.load(str(two / "model_ctx.onnx"))
    assert [n.op_type for n in ctx.graph.node] == ["EPContext", "EPContext"]
    io = load_io(two)
    y2 = HtpArtifact(two).run(io["inputs"])[0]
    y1 = HtpArtifact(one).run(load_io(one)["inputs"])[0]
    np.testing.assert_array_equal(y2.numpy(), y1.numpy())        # fp16 values cross the cut exactly
    res = verify_artifact(two)
    assert res["summary"]["passed"]
    # each part's binary is covered by its own stable hash
    path = two / "model_ctx_p1_qnn.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model_ctx_p1_qnn.bin"):
        HtpArtifact(two).check_context()


def test_binary_bytes_by_kind_add_up_and_count_int4_at_half_a_byte(compiled):
    out, result = compiled("sana", 4.0, target="htp")
    b = read_manifest(out)["backend"]
    x = b["binary"]
    assert x["binary_bytes"] == (out / "model_ctx_qnn.bin").stat().st_size
    assert sum(x["bytes"].values()) == x["binary_bytes"]
    layers = read_manifest(out)["layers"]
    weights = sum(r["params"] for r in layers)
    assert x["quantized_weights"] == weights
    assert x["bytes"]["int4_weights"] == weights // 2                 # all W4: ½ byte each
    assert x["bits_per_quantized_weight"] == pytest.approx(8 * x["binary_bytes"] / weights)
    # float constants: the QDQ model's fp32 initializers not read by a Q/DQ, stored as fp16
    model = onnx.load(str(out / "model.qdq.onnx"))
    qdq_inputs = {v for n in model.graph.node if n.op_type in partition.QDQ for v in n.input}
    floats = sum(int(np.prod(t.dims)) for t in model.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT and t.name not in qdq_inputs)
    assert x["bytes"]["float_constants"] == 2 * floats and x["float_constants_in_onnx"] == 4 * floats
    from fbqc.summaries import compile_summary, inspect_summary

    line = f"{x['bits_per_quantized_weight']:.2f} bits/quantized weight"
    assert line in compile_summary(result) and line in inspect_summary(read_manifest(out))
