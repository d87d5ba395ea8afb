"""Who owns a bit-width (fbqc.spec): the buffers during FAKE_QUANT, the spec from FOLDED on.

What the QAT schedule writes into a layer's bits buffers — weight *and* activations — is what Fold
writes into the spec and what the integer program and its containers are built from.
"""
from __future__ import annotations

import pytest
import torch

import fbqc
from conftest import example
from fbqc.data import samples_around
from fbqc.fx_utils import arg
from fbqc.pass_infra import PassError
from fbqc.passes import AnnotateLinears, Calibrate, Fold, InsertFakeQuant, LowerToInteger
from fbqc.spec import QUANT
from fbqc.stage_contract import VerificationError

LAYER = "transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def exported():
    program, _ = fbqc.export_model_file(example("sana"))
    return program


def _fake_quant(exported):
    return fbqc.PassManager([AnnotateLinears(bits=4), InsertFakeQuant()])(exported)


def _layer(program, layer=LAYER):
    return next(n for n in program.quantized_nodes() if n.meta[QUANT].layer == layer)


def _buffers(program, layer=LAYER):
    """The layer's (weight, input, output) bits buffers of a FAKE_QUANT program."""
    n = _layer(program, layer)
    fq_in, (fq_out,) = arg(n, 0, "input"), n.users
    return [program.attr(a) for a in (arg(n, 1, "weight").args[1], fq_in.args[3], fq_out.args[3])]


def test_buffers_written_after_insert_fake_quant_reach_the_integer_program(exported):
    fq = _fake_quant(exported)
    w_bits, in_bits, out_bits = _buffers(fq)
    with torch.no_grad():                       # what a QAT schedule does: write the buffers
        w_bits.fill_(5.5)
        in_bits.fill_(16)
        out_bits.fill_(16)
    assert fq.specs()[LAYER].input.bits == 8    # the spec still holds the annotation's start values
    data = samples_around(fq.example_inputs)
    pm = fbqc.PassManager([Calibrate(data, 2), Fold()], verify_each=True)
    folded = pm(fq)
    spec = folded.specs()[LAYER]
    assert (spec.weight.bits, spec.input.bits, spec.output.bits) == (5.5, 16, 16)
    assert type(spec.input.bits) is int and spec.describe() == "W5.5A16"
    other = folded.specs()["transformer_blocks.0.attn1.to_k"]
    assert (other.weight.bits, other.input.bits, other.output.bits) == (4, 8, 8)
    # calibration read the buffer: the 16-bit input quantizer has a 16-bit scale (≈ range / 65535)
    ranges = folded.info["act_ranges"]
    row = ranges[f"{LAYER} (input)"]
    assert row["scale"] == pytest.approx((max(row["hi"], 0) - min(row["lo"], 0)) / 65535, rel=1e-6)

    integer = fbqc.PassManager([LowerToInteger()], verify_each=True)(folded)
    n = _layer(integer)
    xq = arg(n, 0, "xq")
    assert arg(xq, 3, "bits") == 16.0 and arg(n, 9, "y_bits") == 16.0
    assert xq.meta["val"].dtype == torch.int32 and n.meta["val"].dtype == torch.int32   # uint16 codes
    k = _layer(integer, "transformer_blocks.0.attn1.to_k")
    assert arg(k, 0, "xq").meta["val"].dtype == torch.uint8 and k.meta["val"].dtype == torch.uint8
    # and it runs: the A16 layer's kernels produce int32-held uint16 codes, as the metadata says
    assert torch.isfinite(integer.run_example()[0]).all()
    assert torch.ops.fbqc.quantize(torch.zeros(2), 0.5, 3, arg(xq, 3, "bits")).dtype == torch.int32


def test_folded_verifier_rejects_an_activation_buffer_that_differs_from_the_spec(exported):
    fq = _fake_quant(exported)
    data = samples_around(fq.example_inputs)
    folded = fbqc.PassManager([Calibrate(data, 1), Fold()])(fq)
    fbqc.verify(folded)
    n = _layer(folded)
    with torch.no_grad():
        folded.attr(arg(n, 0, "input").args[3]).fill_(16)      # written after Fold: not the owner
    with pytest.raises(VerificationError, match="input bits buffer .* holds 16 but the spec says 8"):
        fbqc.verify(folded)


def test_fold_names_an_activation_buffer_it_cannot_take(exported):
    fq = _fake_quant(exported)
    with torch.no_grad():
        _buffers(fq)[2].fill_(6)
    data = samples_around(fq.example_inputs)
    cal = Calibrate(data, 1)(fq).program
    with pytest.raises(PassError, match=f"layer {LAYER}: its output bits buffer .* holds 6"):
        Fold()(cal)
