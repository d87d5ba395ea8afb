"""The fbqc command line, including every bad-input path of the core-pipeline issue."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from conftest import example
from fbqc.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def no_partial(parent):
    return [p.name for p in parent.iterdir() if p.name.endswith(".tmp")] == []


def test_compile_verify_inspect(tmp_path):
    out = tmp_path / "sana"
    r = run("compile", example("sana"), "--bits", "4.5", "-o", out, "--calib-samples", "4", "--quiet",
            "--verify-each")
    assert r.exit_code == 0, r.output
    for word in ("layers quantized", "W4.5A8", "bits / quantized param", "integer vs float"):
        assert word in r.output
    r = run("verify", out)
    assert r.exit_code == 0, r.output
    assert "int32 accumulators identical: True" in r.output and "AGREE" in r.output
    r = run("inspect", out)
    assert r.exit_code == 0 and "transformer_blocks.0.attn1.to_q" in r.output and "-11…10" in r.output
    assert "AnnotateLinears → InsertFakeQuant → Calibrate → Fold → LowerToInteger" in r.output
    r = run("verify", out, "--json")
    assert json.loads(r.output)["summary"]["acc_identical"] is True


def test_compile_json_and_existing_output(tmp_path):
    out = tmp_path / "o"
    r = run("compile", example("pixart_sigma"), "-o", out, "--calib-samples", "2", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["manifest"]["layers"] and data["timings"]["total"] > 0
    r = run("compile", example("pixart_sigma"), "-o", out, "--calib-samples", "2", "-q")
    assert r.exit_code == 2 and "exists; pass --force" in r.output
    r = run("compile", example("pixart_sigma"), "-o", out, "--calib-samples", "2", "-q", "--force")
    assert r.exit_code == 0, r.output


def test_list_commands():
    r = run("list-passes")
    assert r.exit_code == 0
    names = [line.split()[0] for line in r.output.strip().splitlines()]
    assert names == ["AnnotateLinears", "InsertFakeQuant", "Calibrate", "Fold", "LowerToInteger"]
    r = run("list-backends")
    assert r.exit_code == 0 and r.output.startswith("cpu") and "torch" in r.output


def test_dry_run_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("compile", example("sana"), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "layers to quantize" in r.output and "full compile needs about" in r.output
    assert list(tmp_path.iterdir()) == []


BROKEN = {
    "missing.py": None,
    "syntax.py": "def model(:\n",
    "nofuncs.py": "x = 1\n",
    "raises.py": "raise RuntimeError('boom')\n",
    "badinputs.py": ("import torch\nclass M(torch.nn.Module):\n    def forward(self, x):\n        return x\n"
                     "def model():\n    return M()\ndef example_inputs():\n    return {'y': torch.ones(1)}\n"),
    "unexportable.py": ("import torch\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
                        "        if x.sum() > 0:\n            return x\n        return -x\n"
                        "def model():\n    return M()\ndef example_inputs():\n    return {'x': torch.ones(2)}\n"),
    "nopreset.py": ("import torch\ndef model():\n    return torch.nn.Linear(2, 2)\n"
                    "def example_inputs():\n    return {'input': torch.ones(2)}\n"),
}
EXPECT = {
    "missing.py": "does not exist",
    "syntax.py": "syntax.py:1: syntax error",
    "nofuncs.py": "missing required function(s) model(), example_inputs()",
    "raises.py": "raises.py:1: importing the model file failed: RuntimeError: boom",
    "badinputs.py": "example_inputs() has 'y', which M.forward does not take",
    "unexportable.py": "torch.export of M failed",
    "nopreset.py": "model() takes no 'preset' argument, so --preset cannot be used",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_bad_model_files(tmp_path, name):
    path = tmp_path / name
    if BROKEN[name] is not None:
        path.write_text(BROKEN[name])
    extra = ["--preset", "tiny"] if name == "nopreset.py" else []
    r = run("compile", path, "-o", tmp_path / "out", "-q", *extra)
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and EXPECT[name] in lines[0] and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists() and no_partial(tmp_path)


@pytest.mark.parametrize("bits,msg", [("abc", "must be a number"), ("0.5", "[2, 16]"), ("17", "[2, 16]"),
                                      ("1", "[2, 16]"), ("1.5", "every weight quantizes to 0")])
def test_bad_bits(tmp_path, bits, msg):
    r = run("compile", example("sana"), "--bits", bits, "-o", tmp_path / "o")
    assert r.exit_code == 2 and msg in r.output and not (tmp_path / "o").exists()


def test_unknown_target_and_unwritable_output(tmp_path):
    r = run("compile", example("sana"), "--target", "tpu", "-o", tmp_path / "o", "-q")
    assert r.exit_code == 2 and "unknown target 'tpu'; installed backends: cpu" in r.output
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        r = run("compile", example("sana"), "-o", locked / "o", "-q")
        assert r.exit_code == 2 and "is not writable" in r.output
    finally:
        os.chmod(locked, 0o700)


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run("compile", example("sana"), "-o", tmp_path / "afile" / "o", "-q")
    assert r.exit_code == 2 and "cannot write" in r.output and "not a directory" in r.output


def test_failure_midway_leaves_no_artifact(tmp_path, monkeypatch):
    from fbqc.backends.cpu import CpuBackend

    def explode(self, program, options, out_dir):
        (out_dir / "program.pt2").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(CpuBackend, "compile", explode)
    r = CliRunner().invoke(main, ["compile", str(example("sana")), "-o", str(tmp_path / "o"), "-q",
                                  "--calib-samples", "1"])
    assert r.exit_code != 0 and "disk full" in r.output
    assert list(tmp_path.iterdir()) == []


def test_verify_detects_tampering(tmp_path, compiled):
    out, _ = compiled("sana", 4)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "program.pt2", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    r = run("verify", copy)
    assert r.exit_code == 2 and "do not match the manifest's hashes" in r.output
    r = run("verify", tmp_path)
    assert r.exit_code == 2 and "not an fbqc artifact" in r.output


def test_debug_shows_traceback(tmp_path):
    r = CliRunner().invoke(main, ["--debug", "compile", str(tmp_path / "nope.py"), "-q"])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_checkpoint_reaches_the_model_file(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sana_ex", example("sana"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.model()
    import torch
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():   # a checkpoint that differs from the random preset
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    m.save_pretrained(tmp_path / "ckpt" / "transformer")
    r = run("compile", example("sana"), "--checkpoint", tmp_path / "ckpt", "-o", tmp_path / "a", "-q",
            "--calib-samples", "2", "--json")
    assert r.exit_code == 0, r.output
    r2 = run("compile", example("sana"), "-o", tmp_path / "b", "-q", "--calib-samples", "2", "--json")
    a, b = json.loads(r.output)["manifest"], json.loads(r2.output)["manifest"]
    assert a["model"]["opts"]["checkpoint"] == str(tmp_path / "ckpt")
    assert a["layers"][0]["weight_sha256"] != b["layers"][0]["weight_sha256"]
    r = run("compile", example("sana"), "--checkpoint", tmp_path / "nope", "-o", tmp_path / "c", "-q")
    assert r.exit_code == 2 and "does not exist" in r.output
