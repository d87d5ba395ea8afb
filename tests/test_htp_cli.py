"""The htp backend through the command line: compile, verify, profile, list-backends, --soc."""
from __future__ import annotations

import json

from click.testing import CliRunner

from fbqc.cli import main
from test_htp_lowering import toy_model


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compile_verify_profile(tmp_path):
    out = tmp_path / "toy_htp"
    r = run("compile", toy_model(tmp_path), "--target", "htp", "--bits", "4", "-o", out, "--calib-samples",
            "4", "--quiet")
    assert r.exit_code == 0, r.output
    assert "htp (fbqc" in r.output and "W4A8 ×4" in r.output
    r = run("verify", out)
    assert r.exit_code == 0, r.output
    assert "teacher-forced" in r.output and "100.000 % within 1 LSB" in r.output and "AGREE" in r.output
    r = run("verify", out, "--json")              # native library banners must not reach stdout
    data = json.loads(r.output)
    assert data["summary"]["a8_within_1lsb"] >= 0.999 and data["backend"] == "htp"
    r = run("profile", out, "--csv", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    assert "FullyConnected" in r.output and "cycles" in r.output
    assert "Accelerator (execute) time (cycles)" in (tmp_path / "p.csv").read_text()
    prof = json.loads(run("profile", out, "--json").output)
    assert prof["total_cycles"] > 0 and prof["node_cycles"] == sum(r["cycles"] for r in prof["by_op_type"])
    fc = next(r for r in prof["by_op_type"] if r["op"] == "FullyConnected")
    assert fc["nodes"] >= 4
    assert {r["layer"] for r in prof["by_layer"]} >= {"blocks.0.fc1", "blocks.1.fc2"}


def test_list_backends_shows_htp_with_versions():
    r = run("list-backends")
    line = next(ln for ln in r.output.splitlines() if ln.startswith("htp"))
    assert "onnxruntime 1.32.0" in line and "onnxruntime-qnn 2.7.0" in line and "QNN SDK 2.51" in line


def test_soc_errors(tmp_path):
    model = toy_model(tmp_path)
    r = run("compile", model, "--target", "htp", "--soc", "SM1234", "-o", tmp_path / "a", "--quiet")
    assert r.exit_code == 2 and "unknown --soc 'SM1234'" in r.output and "SM8750" in r.output
    r = run("compile", model, "--soc", "SM8650", "-o", tmp_path / "b", "--quiet")
    assert r.exit_code == 2 and "--soc is an option of the htp backend" in r.output


def test_profile_of_a_cpu_artifact_is_a_clear_error(tmp_path):
    out = tmp_path / "cpu"
    assert run("compile", toy_model(tmp_path), "-o", out, "--calib-samples", "2", "--quiet").exit_code == 0
    r = run("profile", out)
    assert r.exit_code == 2 and "no simulator profile" in r.output
