"""End to end: tiny seed architectures compiled to the cpu backend and verified (DESIGN.md §3)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ARCHS, example
from fbqc.artifact import read_manifest
from fbqc.artifact_verify import verify_artifact


@pytest.mark.parametrize("bits", [4, 4.5, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_reference_agrees_with_fake_quant(compiled, arch, bits):
    out, result = compiled(arch, bits)
    report = verify_artifact(out)
    s = report["summary"]
    assert s["layers"] == len(result["manifest"]["layers"]) > 0
    # int32 accumulators identical to an exact float64 computation of the same codes
    assert s["acc_identical"], [r for r in report["per_layer"] if r["acc_mismatches"]]
    # requantized codes identical to the contract formula evaluated in NumPy
    assert s["contract_identical"]
    # identical to the fake-quant model's float path except exact .5 ties
    assert s["fq_other"] == 0 and s["max_lsb"] <= 1
    assert s["fq_identical_fraction"] > 0.999
    e2e = report["end_to_end_vs_fake_quant"][0]
    assert e2e["rel_error"] < 1e-3, e2e
    # and the quantized model is a real approximation of the float one
    vs_float = report["end_to_end_vs_float"][0]["rel_error"]
    assert 0 < vs_float < (0.5 if bits < 8 else 0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_integer_levels_and_containers(compiled, arch):
    for bits, levels, container in [(4, (-8, 7), "int4"), (4.5, (-11, 10), "int8"), (8, (-128, 127), "int8")]:
        out, result = compiled(arch, bits)
        from fbqc.backends.cpu import CpuBackend

        loaded = CpuBackend().load(out)
        for layer, node in loaded.layers().items():
            wq = loaded.constants(node)[3]
            assert wq.dtype == torch.int8
            assert levels[0] <= int(wq.min()) and int(wq.max()) <= levels[1]
            # at least one channel reaches an extreme level (scale = max|W| / qmax)
            assert int(wq.abs().max()) >= levels[1]
        assert {r["container"] for r in result["manifest"]["layers"]} == {container}


def test_serialised_program_reloads_and_runs_identically(compiled):
    out, result = compiled("sana", 4)
    from fbqc.artifact import load_io
    from fbqc.backends.cpu import CpuBackend

    io = load_io(out)
    a = CpuBackend().load(out).run(io["inputs"])
    b = CpuBackend().load(out).run(io["inputs"])
    assert torch.equal(a[0], b[0])
    # the stored fake-quant outputs are what the artifact is checked against
    assert torch.allclose(a[0], io["fake_quant_outputs"][0], rtol=0, atol=1e-3)


def test_artifact_is_byte_identical_for_same_inputs(tmp_path):
    from fbqc.pipeline import CompileOptions, compile_model

    opts = CompileOptions(bits=4.5, calib_samples=4)
    for d in ("a", "b"):
        compile_model(example("sana"), tmp_path / d, opts, progress=False, log=lambda s: None)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_manifest_contents(compiled):
    out, result = compiled("sana", 4)
    m = read_manifest(out)
    assert m["backend"]["name"] == "cpu"
    assert m["flags"]["bits"] == 4
    assert [s["pass"] for s in m["stages"]] == ["AnnotateLinears", "InsertFakeQuant", "Calibrate", "Fold",
                                                 "LowerToInteger"]
    assert set(m["files"]) == {"program.pt2", "io.pt"}
    for row in m["layers"]:
        assert row["layer"].startswith("transformer_blocks.")
        assert len(row["weight_sha256"]) == 64 and row["weight_bits"] == 4
    # int4 weights: 4 bits + one fp32 scale per output channel
    s = m["size"]
    assert 4 < s["bits_per_quantized_param"] < 6
    json.dumps(m)


def test_wide_range_weights_lower_with_zero_points(compiled):
    out, _ = compiled("pixart_sigma", 4, scheme="wide")
    s = verify_artifact(out)["summary"]
    assert s["acc_identical"] and s["contract_identical"] and s["fq_other"] == 0


def test_a16_layer_and_bit_override(compiled):
    out, result = compiled("sana", 4, include=("blocks\\.\\d+\\.", "proj_out"),
                           layer_bits={"proj_out": 8.0}, a16=("proj_out",))
    rows = {r["layer"]: r for r in result["manifest"]["layers"]}
    assert rows["proj_out"]["weight_bits"] == 8 and rows["proj_out"]["act_bits_in"] == 16
    assert rows["transformer_blocks.0.attn1.to_q"]["act_bits_in"] == 8
    report = verify_artifact(out)
    assert report["summary"]["exact"]
    # the model output is now produced by the A16 quantizer of proj_out... through unpatchify
    assert report["end_to_end_vs_fake_quant"][0]["rel_error"] < 1e-3
