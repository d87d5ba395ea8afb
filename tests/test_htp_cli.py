"""The htp backend through the command line: compile, verify, profile, list-backends, --soc."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

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
    r = run("compile", model, "--contexts", "2", "-o", tmp_path / "c", "--quiet")
    assert r.exit_code == 2 and "--contexts is an option of the htp backend" in r.output
    r = run("compile", model, "--target", "htp", "--contexts", "0", "-o", tmp_path / "d", "--quiet")
    assert r.exit_code == 2 and "--contexts" in r.output
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_profile_of_a_cpu_artifact_is_a_clear_error(tmp_path):
    out = tmp_path / "cpu"
    assert run("compile", toy_model(tmp_path), "-o", out, "--calib-samples", "2", "--quiet").exit_code == 0
    r = run("profile", out)
    assert r.exit_code == 2 and "no simulator profile" in r.output


# --- the context binary's stable hash; what compile and inspect show (issue 16, point 10) -------------

def _rewrite_raw_hash(out, name="model_ctx_qnn.bin"):
    """Record the file's new raw SHA-256 (as if the manifest were rewritten): only the stable hash is left
    to notice the change."""
    from fbqc.artifact import sha256_file

    m = json.loads((out / "manifest.json").read_text())
    m["files"][name] = sha256_file(out / name)
    (out / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def test_context_binary_stable_hash(compiled, tmp_path):
    from fbqc.backends.htp.ctx_hash import check, describe, lut_lines, stable_sha256

    def describe_bytes(data):
        return stable_sha256(data, lut_lines(data))

    out, result = compiled("sana", 4.0, target="htp")
    entry = result["manifest"]["backend"]["context_binary"]
    assert entry["varying_ranges"] and entry["stable_sha256"] == describe(out / "model_ctx_qnn.bin")["stable_sha256"]
    # a second compile of the same context (fresh process: the graph name does not depend on this one):
    # raw bytes differ in the lookup tables' unwritten halves; the stable hash is the same
    qdq = out / "model.qdq.onnx"
    script = ("import sys; from pathlib import Path; from fbqc.backends.htp import qnn\n"
              "qnn.session(Path(sys.argv[1]), qnn.soc(None), context=Path(sys.argv[2]) / 'model_ctx.onnx')")
    runs = []
    for i in range(3):                 # two fresh compiles almost always differ; a third if they did not
        d = tmp_path / f"ctx{i}"
        d.mkdir()
        subprocess.run([sys.executable, "-c", script, str(qdq), str(d)], check=True, capture_output=True)
        runs.append((d / "model_ctx_qnn.bin").read_bytes())
        if len(set(runs)) > 1:
            break
    a, b = runs[0], next(r for r in runs if r != runs[0])
    assert len(a) == len(b) and describe_bytes(a) == describe_bytes(b)
    ranges = lut_lines(a)
    differ = [i for i in range(len(a)) if a[i] != b[i]]
    assert differ and all(any(s <= i < e for s, e in ranges) for i in differ)
    # verify checks it: a byte that differs between two real compiles may change, any other byte may not
    art = tmp_path / "art"
    shutil.copytree(out, art)
    binary = art / "model_ctx_qnn.bin"
    data = bytearray(binary.read_bytes())
    i = differ[0]
    data[i] = a[i] if data[i] != a[i] else b[i]
    binary.write_bytes(data)
    _rewrite_raw_hash(art)
    assert check(art, entry) is None
    r = run("verify", art)
    assert r.exit_code == 0 and "AGREE" in r.output, r.output
    fixed = next(i for i in range(len(data)) if not any(s <= i < e for s, e in entry["varying_ranges"]) and data[i])
    data[fixed] ^= 0x01
    binary.write_bytes(data)
    _rewrite_raw_hash(art)
    assert "stable_sha256" in check(art, entry)
    r = run("verify", art)
    assert r.exit_code == 2 and "model_ctx_qnn.bin" in r.output and "stable_sha256" in r.output


def test_htp_summary_and_inspect_show_placement_and_binary(compiled):
    from fbqc.summaries import compile_summary

    out, result = compiled("sana", 4.0, target="htp")
    b = result["manifest"]["backend"]
    n, kb = b["placement"]["nodes"], b["sizes"]["model_ctx_qnn.bin"] / 1e6
    rows = {ln.split("  ")[0]: ln.split("  ")[-1].strip() for ln in
            compile_summary({**result, "artifact": str(out)}).splitlines()}
    assert rows["placement"] == f"{n} of {n} ONNX nodes on the HTP (SM8750, v79), 0 on the CPU"
    assert rows["context binary"].startswith(f"model_ctx_qnn.bin {kb:.2f} MB, stable sha256 ")
    r = run("inspect", out)
    assert r.exit_code == 0, r.output
    assert f"htp      {n} of {n} ONNX nodes on the HTP (SM8750, v79), 0 on the CPU" in r.output
    assert f"context  model_ctx_qnn.bin {kb:.2f} MB, stable sha256 {b['context_binary']['stable_sha256'][:12]}" \
        in r.output
    assert "\nrun " not in r.output


def test_inspect_shows_the_training_run(tmp_path):
    from conftest import example

    runs = tmp_path / "run"
    r = run("train", example("sana"), "--steps", "2", "-o", runs, "--quiet")
    assert r.exit_code == 0, r.output
    out = tmp_path / "art"
    r = run("compile", runs, "--target", "cpu", "-o", out, "--quiet", "--calib-samples", "2")
    assert r.exit_code == 0, r.output
    recorded = json.loads((out / "manifest.json").read_text())["run"]
    line = f"run      {recorded['dir']} (schedule {recorded['schedule']}, 2 steps)"
    assert str(runs) in line
    r = run("inspect", out)
    assert r.exit_code == 0 and r.output.splitlines()[1] == line, r.output
    assert "htp " not in r.output and "context " not in r.output        # a cpu artifact: no HTP lines
