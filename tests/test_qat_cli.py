"""`fbqc train` → `fbqc compile RUN_DIR` → `fbqc verify`, end to end on tiny Sana, and the bad-input paths."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import example
from fbqc.cli import main
from fbqc.frontend import load_model_file
from fbqc.ops.fake_quant import weight_codes

pytestmark = pytest.mark.usefixtures("single_thread")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_train_compile_verify_a_run(tmp_path):
    runs = tmp_path / "runs" / "sana"
    r = run("train", example("sana"), "--schedule", "fractional", "--steps", "12", "--lr", "1e-3",
            "--checkpoint-every", "5", "--layer-bits", "proj_out=8", "-o", runs, "--stop-after", "5", "-q")
    assert r.exit_code == 0, r.output
    assert "5/12 steps" in r.output and "not finished" in r.output
    r = run("compile", runs, "-q")
    assert r.exit_code == 2 and "has not finished" in r.output
    r = run("train", "--resume", runs, "--steps", "20")
    assert r.exit_code == 2 and "--steps 12; resuming with --steps 20" in r.output
    r = run("train", "--resume", runs, "--lr", "1")
    assert r.exit_code == 2 and "drop --lr" in r.output
    r = run("train", example("sana"), "-o", runs)
    assert r.exit_code == 2 and "pass --resume" in r.output
    r = run("train", "--resume", runs, "-q")
    assert r.exit_code == 0, r.output
    assert "12/12 steps" in r.output and "fbqc compile" in r.output
    rows = [json.loads(x) for x in (runs / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(1, 13)) and rows[-1]["bits"] == 4
    run_json = json.loads((runs / "run.json").read_text())
    assert run_json["source"]["fixed_layers"] == {"proj_out": 8.0}
    assert run_json["data"] == "training_data() of the model file"

    r = run("compile", runs, "--bits", "3", "-q")
    assert r.exit_code == 2 and "--bits come(s) from the run" in r.output
    out = tmp_path / "art"
    r = run("compile", runs, "-o", out, "--calib-samples", "4", "-q", "--verify-each")
    assert r.exit_code == 0, r.output
    r = run("verify", out)
    assert r.exit_code == 0 and "int32 accumulators identical: True" in r.output and "AGREE" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["schedule_name"] == "fractional" and manifest["run"]["steps"] == 12
    assert [s["pass"] for s in manifest["stages"]][:4] == ["AnnotateLinears", "InsertFakeQuant",
                                                          "LoadTrainedState", "Calibrate"]
    bits = {x["layer"]: x["weight_bits"] for x in manifest["layers"]}
    assert bits.pop("proj_out") == 8 and set(bits.values()) == {4}

    # the artifact's integer weights are the trained student's, quantized at the final bits
    from fbqc.backends.cpu import CpuBackend

    student = torch.load(runs / "student.pt")
    teacher_w = load_model_file(example("sana")).call("model").state_dict()     # the untrained weights
    loaded = CpuBackend().load(out)
    changed = 0
    for layer, node in loaded.layers().items():
        wq = loaded.constants(node)[3]
        b = torch.tensor(8.0 if layer == "proj_out" else 4.0, dtype=torch.float64)
        q, _, _ = weight_codes(student[f"{layer}.weight"], b, axis=0)
        assert torch.equal(wq.to(torch.float32).reshape(q.shape), q), layer
        q0, _, _ = weight_codes(teacher_w[f"{layer}.weight"], b, axis=0)
        changed += int((q0 != q).sum())
    assert changed > 0                                    # training moved some codes


def test_default_run_and_artifact_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("train", example("sana"), "--schedule", "direct", "--steps", "2", "-q", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["finished"] is True and (tmp_path / "runs" / "sana" / "student.pt").is_file()
    r = run("compile", "runs/sana", "--calib-samples", "2", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "sana" / "manifest.json").is_file()
    r = run("train", "--schedule", "direct")
    assert r.exit_code == 2 and "needs a MODEL_FILE" in r.output
    r = run("train", example("sana"), "--schedule", "8:1,x", "-o", "runs/bad", "-q")
    assert r.exit_code == 2 and "BITS:PARTS" in r.output
