"""Pass infrastructure, verifiers and the notebook-style Python API."""
from __future__ import annotations

import io
import time

import pytest
import torch

import fbqc
from conftest import example
from fbqc import PassManager, PassResult, Stage
from fbqc.data import samples_around
from fbqc.pass_infra import Pass, PostconditionError, PreconditionError
from fbqc.passes import AnnotateLinears, Calibrate, Fold, InsertFakeQuant, LowerToInteger
from fbqc.spec import QUANT, QuantSpec
from fbqc.stage_contract import VerificationError


@pytest.fixture(scope="module")
def exported():
    program, _ = fbqc.export_model_file(example("sana"))
    return program


def test_researcher_api_custom_pass_list(exported):
    class AttentionAt8Bits(Pass):
        """Keep every attention projection at 8 bits."""
        requires = produces = Stage.ANNOTATED

        def run(self, program):
            for n in program.quantized_nodes():
                if ".attn" in n.meta[QUANT].layer:
                    n.meta[QUANT] = n.meta[QUANT].with_bits(8)
            return PassResult(program, True)

    data = samples_around(exported.example_inputs)
    pm = PassManager([AnnotateLinears(bits=4.5), AttentionAt8Bits(), InsertFakeQuant(), Calibrate(data, 3)],
                     verify_each=True)
    start = time.perf_counter()
    fq = pm(exported)
    elapsed = time.perf_counter() - start
    assert fq.stage == Stage.FAKE_QUANT
    specs = fq.specs()
    assert all(isinstance(s, QuantSpec) for s in specs.values())
    assert specs["transformer_blocks.0.attn1.to_q"].weight.bits == 8
    assert specs["transformer_blocks.0.ff.conv_inverted"].weight.bits == 4.5
    assert specs["transformer_blocks.0.ff.conv_inverted"].kind == "conv1x1"
    assert [r.name for r in fq.history] == ["AnnotateLinears", "AttentionAt8Bits", "InsertFakeQuant", "Calibrate"]
    # each pass's own time, in seconds: positive, and together no more than the whole run took
    assert all(r.seconds > 0 for r in fq.history) and sum(r.seconds for r in fq.history) <= elapsed
    # functional passes left the input untouched
    assert exported.stage == Stage.EXPORTED and not exported.quantized_nodes()
    # and the fake-quant program runs and approximates the float model
    ref = exported.run_example()[0]
    out = fq.run_example()[0]
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.2


def test_pass_manager_times_each_pass(exported):
    """A pass's record holds the seconds that pass took: a pass that sleeps 0.2 s is recorded at
    0.2 s or more, and within what the caller measured around the whole run."""
    class Sleep(Pass):
        requires = produces = Stage.EXPORTED

        def __init__(self, seconds):
            self.seconds = seconds

        def run(self, program):
            time.sleep(self.seconds)
            return PassResult(program, False)

    start = time.perf_counter()
    out = PassManager([Sleep(0.0), Sleep(0.2)])(exported)
    elapsed = time.perf_counter() - start
    quick, slow = out.history
    assert quick.name == slow.name == "Sleep"
    assert 0.2 <= slow.seconds <= elapsed and quick.seconds < slow.seconds
    assert quick.seconds + slow.seconds <= elapsed


def test_precondition_names_pass_and_stage(exported):
    with pytest.raises(PreconditionError, match="pass Fold: needs a FAKE_QUANT program, got EXPORTED"):
        Fold()(exported)


def test_functional_pass_that_mutates_its_input_is_caught(exported):
    class Sneaky(Pass):
        requires = produces = Stage.EXPORTED

        def run(self, program):
            self.victim.graph.create_node("call_function", torch.ops.aten.relu.default, ())
            return PassResult(program, False)

    p = exported.copy()
    s = Sneaky()
    s.victim = p
    with pytest.raises(PostconditionError, match="Sneaky: declared functional"):
        s(p)


def test_verify_each_names_pass_node_and_rule(exported):
    class DropOutputQuant(Pass):
        """Breaks the FAKE_QUANT contract: removes one output fake quant."""
        requires = produces = Stage.FAKE_QUANT

        def run(self, program):
            node = program.quantized_nodes()[0]
            (fq_out,) = node.users
            fq_out.replace_all_uses_with(node)
            program.graph.erase_node(fq_out)
            return PassResult(program, True)

    pm = PassManager([AnnotateLinears(), InsertFakeQuant(), DropOutputQuant()], verify_each=True)
    with pytest.raises(VerificationError) as e:
        pm(exported)
    msg = str(e.value)
    assert "after pass DropOutputQuant" in msg and "FAKE_QUANT verifier" in msg
    assert "node linear" in msg and "output must feed exactly one fbqc.fake_quant_act" in msg


def test_verifier_rejects_ops_of_a_later_stage(exported):
    p = AnnotateLinears()(exported).program
    node = p.quantized_nodes()[0]
    with p.graph.inserting_after(node):
        bad = p.graph.call_function(torch.ops.fbqc.fake_quant_act.default, (node, node, node, node))
    bad.meta["val"] = node.meta["val"]
    with pytest.raises(VerificationError, match="op fbqc.fake_quant_act.default is not allowed at stage ANNOTATED"):
        fbqc.verify(p, after="test")


def test_fold_requires_calibration(exported):
    fq = PassManager([AnnotateLinears(), InsertFakeQuant()])(exported)
    folded = Fold()(fq).program
    with pytest.raises(VerificationError, match="activation scale is not calibrated"):
        fbqc.verify(folded, after="Fold")


def test_print_after_change_only_for_modifying_passes(exported):
    class Nothing(Pass):
        requires = produces = Stage.ANNOTATED

        def run(self, program):
            return PassResult(program, False)

    buf = io.StringIO()
    PassManager([AnnotateLinears(), Nothing()], print_after_change=buf)(exported)
    text = buf.getvalue()
    assert "after AnnotateLinears (ANNOTATED)" in text and "after Nothing" not in text
    assert "torch.ops.aten.linear.default" in text


def test_stage_verifiers_accept_every_stage_of_the_pipeline(exported):
    data = samples_around(exported.example_inputs)
    seen = []

    class Record(fbqc.pass_infra.Instrument):
        def after_pass(self, p, result, record):
            seen.append(result.program.stage)

    out = PassManager([AnnotateLinears(), InsertFakeQuant(), Calibrate(data, 2), Fold(), LowerToInteger()],
                      verify_each=True, instruments=[Record()])(exported)
    assert seen == [Stage.ANNOTATED, Stage.FAKE_QUANT, Stage.FAKE_QUANT, Stage.FOLDED, Stage.INTEGER]
    ops = {str(n.target) for n in out.graph.nodes if n.op == "call_function"}
    assert "fbqc.qlinear.default" in ops and "fbqc.qconv2d_1x1.default" in ops
    assert not any("fake_quant" in o for o in ops) and "aten.linear.default" in ops  # float linears remain


def test_fold_uses_bits_buffer_and_matches_fake_quant_exactly(exported):
    """dequantize_weight(Wq, S) equals fake_quant_weight(W) bit for bit, so FOLDED == FAKE_QUANT."""
    data = samples_around(exported.example_inputs)
    fq = PassManager([AnnotateLinears(bits=5.5), InsertFakeQuant(), Calibrate(data, 2)])(exported)
    folded = Fold()(fq).program
    assert torch.equal(fq.run_example()[0], folded.run_example()[0])
    assert all(s.weight.bits == 5.5 for s in folded.specs().values())


def test_program_maps_its_inputs_to_placeholders_nested_or_not():
    """Program.flat_inputs: keyword inputs (nested dicts and lists, key order free) → the placeholders'
    values; Program.input_names: placeholder → the example input's key or path. Checked against
    the exported module called with the same inputs and against the example tree itself."""
    from fbqc.frontend import export

    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, hidden_states, cond=None, mask=None):
            return self.lin(hidden_states) * cond["a"] + cond["b"][1] - cond["b"][0]

    g = torch.Generator().manual_seed(0)
    x = {"hidden_states": torch.randn(2, 3, generator=g), "mask": None,
         "cond": {"b": [torch.randn(3, generator=g), torch.randn(3, generator=g)], "a": torch.randn(3, generator=g)}}
    program = export(Nested(), x)
    names = program.input_names()
    assert names == {"hidden_states": "hidden_states", "cond_b_0": "cond['b'][0]", "cond_b_1": "cond['b'][1]",
                     "cond_a": "cond['a']", "mask": "mask"}
    reordered = {"cond": {"a": x["cond"]["a"], "b": x["cond"]["b"]}, "mask": None, "hidden_states": x["hidden_states"]}
    flat = program.flat_inputs(reordered)
    by_path = {"hidden_states": x["hidden_states"], "cond['b'][0]": x["cond"]["b"][0],
               "cond['b'][1]": x["cond"]["b"][1], "cond['a']": x["cond"]["a"], "mask": None}
    assert all(v is by_path[names[n]] for n, v in zip(names, flat))
    out = torch.fx.Interpreter(program.graph_module).run(*flat)      # the placeholders fed positionally
    assert torch.equal(out[0] if isinstance(out, (list, tuple)) else out, program(**x))
