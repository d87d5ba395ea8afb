"""Bounded-time verify and profile of htp artifacts (issue 20): transformer blocks as subgraphs of their own,
sampled block checks, parallel simulator jobs, block profiles, and the command line's messages.

Known answers: an extracted block run in torch on the captured inputs reproduces the reference's outputs
and its layers' codes bit for bit; a block's check does not depend on which other blocks were sampled
nor on --jobs; the teacher-forced rows do not depend on sampling."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from fbqc.artifact import load_io
from fbqc.backends.cpu import CpuBackend
from fbqc.backends.htp import blocks as B
from fbqc.errors import UserError
from fbqc.hooks import hooked
from fbqc.artifact_verify import profile_artifact, verify_artifact


def run(*args):
    from fbqc.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def sana(compiled):
    out, _ = compiled("sana", 4.0, target="htp")
    return out


@pytest.fixture(scope="module")
def full_and_all(sana):
    """verify with the defaults (tiny: the whole model), and --blocks all --full --jobs 2."""
    return verify_artifact(sana), verify_artifact(sana, blocks="all", full=True, jobs=2)


def _codes(program, inputs):
    """Every layer's codes in ``program`` (compiled fx code with hooks, not the Interpreter)."""
    seen = {}

    def record(name, target, xq, *args):
        yq = target(xq, *args)
        seen[name] = {"xq": xq, "yq": yq}
        return yq

    names = {n.name for n in program.quantized_nodes() if n.target in B._LAYER_OPS}
    shadow, chosen = hooked(program, lambda n: n.name in names, record)
    with torch.no_grad():
        out = shadow(**inputs)
    return out, {chosen[k].meta["fbqc.quant"].layer if "fbqc.quant" in chosen[k].meta else k: v
                 for k, v in seen.items()}


def _check_extraction(art_dir, expected_blocks):
    ref = CpuBackend().load(art_dir)
    inputs = load_io(art_dir)["inputs"]
    blocks = B.find_blocks(ref.program)
    assert [b.name for b in blocks] == expected_blocks
    cap = B.capture(ref.program, inputs, blocks)
    # the Interpreter pass is the reference: outputs and every layer's codes as the compiled program's
    assert all(torch.equal(a, b) for a, b in zip(cap.outputs, ref.run(inputs)))
    codes = ref.layer_codes(inputs)
    assert cap.codes.keys() == codes.keys()
    assert all(torch.equal(cap.codes[k][x], codes[k][x]) for k in codes for x in ("xq", "yq"))
    covered = []
    for b in blocks:
        assert b.layers and all(layer.startswith(b.name + ".") for layer in b.layers)
        covered += b.layers
        p = B.extract(ref.program, b, cap.inputs[b.name])
        assert [n.target for n in p.graph.nodes if n.op == "placeholder"] == [i.name for i in b.inputs]
        out, block_codes = _codes(p, cap.inputs[b.name])
        assert len(out) == len(b.outputs) == len(cap.block_outputs[b.name])
        assert all(torch.equal(x, y) for x, y in zip(out, cap.block_outputs[b.name]))   # bit for bit
        assert sorted(block_codes) == sorted(b.layers)
        assert all(torch.equal(block_codes[k][x], codes[k][x]) for k in b.layers for x in ("xq", "yq"))
    assert len(covered) == len(set(covered))


def test_sana_blocks_extract_exactly(sana):
    _check_extraction(sana, ["transformer_blocks.0", "transformer_blocks.1"])


def test_flux_block_lists_are_distinct_blocks_and_extract_exactly(compiled):
    out, _ = compiled("flux_schnell", 4.0)        # the cpu artifact: its reference is the same program
    _check_extraction(out, ["transformer_blocks.0", "single_transformer_blocks.0"])


def _fake_blocks(n=28, group="transformer_blocks"):
    return [B.Block(f"{group}.{i}", i) for i in range(n)]


def test_block_specs_and_sampling():
    bl = _fake_blocks()
    names = lambda sel: [b.index for b in sel]  # noqa: E731
    assert names(B.select(bl, "first,middle,last")) == [0, 13, 27]
    assert names(B.select(bl, "0,13,27")) == [0, 13, 27]
    assert names(B.select(bl, "transformer_blocks.13, -1")) == [13, 27]
    assert names(B.select(bl, "all")) == list(range(28))
    assert names(B.select(bl, None, 3)) == [0, 14, 27]        # evenly spaced, first and last included
    assert names(B.select(bl, None, 1)) == [0]
    assert names(B.select(bl, None, 100)) == list(range(28))
    flux = _fake_blocks(19) + [B.Block(f"single_transformer_blocks.{i}", 19 + i) for i in range(38)]
    assert B.describe(flux) == ("transformer_blocks.0…18, single_transformer_blocks.0…37 "
                                "(57 blocks, indices 0–56)")
    with pytest.raises(UserError, match=r"no block 'x'; known: transformer_blocks\.0…27 \(28 blocks"):
        B.select(bl, "0,x")
    with pytest.raises(UserError, match="no block '28'"):
        B.select(bl, "28")
    with pytest.raises(UserError, match="not both"):
        B.select(bl, "0", 2)
    with pytest.raises(UserError, match="no transformer blocks"):
        B.select([], "all")


def test_a_block_input_the_lowering_would_bake_is_an_error_naming_it():
    import fbqc
    from fbqc.program import Program
    from fbqc.stage import Stage

    class Blk(torch.nn.Module):
        def forward(self, x, pos):
            return x * torch.cos(pos.double()).float()      # float64 computation from a boundary input

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([Blk()])

        def forward(self, x, ids):
            return self.transformer_blocks[0](x + 1, ids * 2)

    ex = {"x": torch.randn(2, 4), "ids": torch.randn(2, 4)}
    p = fbqc.export(M(), ex)
    p = Program(p.graph_module, Stage.INTEGER, ex)
    (b,) = B.find_blocks(p)
    cap = B.capture(p, ex, [b])
    sub = B.extract(p, b, cap.inputs[b.name])
    assert torch.equal(sub.run_example()[0], p.run_example()[0] if isinstance(p.run_example(), tuple)
                       else p.run_example())
    pos = next(i.name for i in b.inputs if i.name.startswith("mul"))
    with pytest.raises(UserError, match=rf"block transformer_blocks\.0: input\(s\) {pos} feed float64"):
        B.lower_block(sub, b)
    sub.example_inputs[pos] = sub.example_inputs[pos].double()
    with pytest.raises(UserError, match=rf"block transformer_blocks\.0: input {pos} is float64"):
        B.lower_block(sub, b)


def _no_seconds(row):
    return {k: v for k, v in row.items() if k != "seconds"}


def test_sampled_verify_known_answers(sana, full_and_all):
    full, both = full_and_all
    assert full["checks"]["end_to_end"]["ran"] and not full["checks"]["blocks"]["ran"]   # tiny: the whole model
    assert "blocks" not in full and full["end_to_end_vs_cpu"]
    # teacher-forced rows: every layer, whatever else ran and however many jobs
    assert both["per_layer"] == full["per_layer"] and both["summary"] == full["summary"]
    assert both["seconds"]["cpu_nodes"] == 0
    # whole-model checks: jobs 2 gives what jobs 1 gave
    assert both["end_to_end_vs_cpu"] == full["end_to_end_vs_cpu"]
    assert both["free_running"] == full["free_running"]
    rows = both["blocks"]["per_block"]
    assert [r["block"] for r in rows] == ["transformer_blocks.0", "transformer_blocks.1"]
    for r in rows:
        assert r["summary"]["layers"] == 10 and r["summary"]["a8_within_1lsb"] > 0.95
        assert 0 < r["vs_cpu"][0]["rel_error"] < 0.05 and r["vs_cpu"][0]["finite"]
        assert set(r["seconds"]) == {"lower", "compile", "run"}
    # a block's result does not depend on which other blocks were sampled, nor on --jobs
    first = verify_artifact(sana, blocks="first")
    assert first["per_layer"] == full["per_layer"]
    assert [_no_seconds(r) for r in first["blocks"]["per_block"]] == [_no_seconds(rows[0])]
    assert not first["checks"]["end_to_end"]["ran"] and "end_to_end_vs_cpu" not in first
    assert first["checks"]["end_to_end"]["why_not"].endswith("--full to run it")
    assert first["estimate"]["parts"]["teacher_forced"]["layers"] == 20
    one = verify_artifact(sana, blocks="1", jobs=1)
    assert [_no_seconds(r) for r in one["blocks"]["per_block"]] == [_no_seconds(rows[1])]


def test_verify_text_says_what_ran_and_the_default_samples_big_models(sana, monkeypatch):
    from fbqc.backends.htp import estimate

    monkeypatch.setattr(estimate, "AUTO_FULL_SECONDS", 0.0)     # as if the whole model took long
    r = run("verify", sana)
    assert r.exit_code == 0, r.output
    assert r.output.index("verify plan (estimated") < r.output.index("teacher-forced (fed")
    assert "blocks transformer_blocks.0, transformer_blocks.1 (2 of 2, first, middle, last by default)" in r.output
    assert "sampled blocks (2 of 2)" in r.output
    assert "end to end not run: estimated" in r.output and "--full to run it" in r.output
    assert "basis: rates measured" in r.output and "AGREE" in r.output
    data = json.loads(run("verify", sana, "--json", "--sample", "1").output)    # no plan lines in JSON
    assert data["checks"]["blocks"]["selected"] == ["transformer_blocks.0"]
    assert data["checks"]["blocks"]["chosen_by"] == "--sample 1"


def test_block_profile(sana, tmp_path):
    res, text = profile_artifact(sana, tmp_path / "p.csv", sample=2, jobs=2)
    rows = res["per_block"]
    assert [r["block"] for r in rows] == ["transformer_blocks.0", "transformer_blocks.1"]
    for r in rows:
        assert r["total_cycles"] > 0 and r["node_cycles"] == sum(o["cycles"] for o in r["by_op_type"])
        assert "FullyConnected" in {o["op"] for o in r["by_op_type"]}
        assert {x["layer"] for x in r["by_layer"]} >= {f"{r['block']}.attn1.to_q"}
        assert "Accelerator (execute) time (cycles)" in open(r["csv"]).read()
    assert res["total_cycles"] == sum(r["total_cycles"] for r in rows)
    assert res["node_cycles"] == sum(o["cycles"] for o in res["by_op_type"])
    est = res["estimate"]
    assert est["transformer_block_cycles"] == round(res["total_cycles"] / 2 * 2)
    assert "2 of 2 blocks profiled" in est["basis"] and "embeddings/final layer not included" in est["basis"]
    assert "2 of 2 blocks profiled" in text and "transformer blocks of the whole model" in text
    one = json.loads(run("profile", sana, "--blocks", "last", "--json").output)
    assert one["per_block"][0]["total_cycles"] > 0 and one["blocks"]["profiled"] == ["transformer_blocks.1"]


def test_cli_messages(sana, compiled):
    cpu, _ = compiled("sana", 4.0)
    r = run("verify", cpu, "--blocks", "first")
    assert r.exit_code == 2
    assert r.output.strip() == ("error: --blocks is for htp artifacts; the cpu backend checks every layer "
                                "and the whole model")
    r = run("verify", cpu, "--jobs", "2")
    assert r.exit_code == 2 and "--jobs is for htp artifacts" in r.output
    r = run("profile", cpu, "--sample", "2")
    assert r.exit_code == 2 and "--sample is for htp artifacts" in r.output
    r = run("verify", sana, "--blocks", "nope")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "no block 'nope'; known: transformer_blocks.0…1 (2 blocks, indices 0–1)" in r.output
    r = run("profile", sana, "--blocks", "7")
    assert r.exit_code == 2 and "no block '7'" in r.output
    r = run("verify", sana, "--blocks", "0", "--sample", "2")
    assert r.exit_code == 2 and "not both" in r.output
    r = run("profile", sana, "--jobs", "2")
    assert r.exit_code == 2 and "give --blocks or --sample" in r.output
    assert "--blocks SPEC" in run("verify", "--help").output and "--sample K" in run("profile", "--help").output
