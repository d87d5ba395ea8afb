"""Nothing lost, nothing wrong passes silently (issue: reliability).

--force replaces only fbqc's own directories and only after every check; non-finite outputs fail
compile and never AGREE in verify; one writer per output directory; killed runs' temporary
directories are cleaned up.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import example
from fbqc.cli import main

SANA = str(example("sana"))


def run(args, cwd=None):
    if cwd is None:
        return CliRunner().invoke(main, args, catch_exceptions=False)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(old)


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    return path


# ---- --force -------------------------------------------------------------------------------------

def test_force_never_replaces_the_current_directory(tmp_path):
    here = _user_dir(tmp_path / "work")
    r = run(["compile", SANA, "-o", ".", "--force"], cwd=here)
    assert r.exit_code == 2
    assert "current directory" in r.output and "--force will not replace" in r.output
    assert (here / "notes.txt").read_text() == "my notes"
    sub = here / "sub"
    sub.mkdir()
    r = run(["compile", SANA, "-o", "..", "--force"], cwd=sub)
    assert r.exit_code == 2 and "one above it" in r.output
    assert (here / "notes.txt").is_file()


def test_force_refuses_a_directory_fbqc_did_not_write(tmp_path):
    mine = _user_dir(tmp_path / "mine")
    r = run(["compile", SANA, "-o", str(mine), "--force"])
    assert r.exit_code == 2
    assert "no fbqc manifest.json" in r.output and "choose another -o" in r.output
    assert (mine / "notes.txt").read_text() == "my notes"


def test_force_replaces_an_artifact_but_not_a_user_file_inside_it(tmp_path):
    out = tmp_path / "art"
    assert run(["compile", SANA, "-o", str(out), "--calib-samples", "2", "-q"]).exit_code == 0
    first = json.loads((out / "manifest.json").read_text())
    (out / "notes.txt").write_text("mine")
    r = run(["compile", SANA, "-o", str(out), "--calib-samples", "2", "-q", "--force"])
    assert r.exit_code == 2 and "'notes.txt', which fbqc did not write there" in r.output
    assert (out / "notes.txt").is_file()
    (out / "notes.txt").unlink()
    r = run(["compile", SANA, "-o", str(out), "--calib-samples", "3", "-q", "--force"])
    assert r.exit_code == 0, r.output
    second = json.loads((out / "manifest.json").read_text())
    assert first["calibration"]["samples"] == 2 and second["flags"]["calib_samples"] == 3
    # a training run is fbqc's too, but not an artifact: compile --force leaves it alone
    run_dir = _fake_run(tmp_path / "run")
    r = run(["compile", SANA, "-o", str(run_dir), "--force"])
    assert r.exit_code == 2 and (run_dir / "checkpoint.pt").is_file()
    assert not list(tmp_path.glob(".*.tmp"))


def _fake_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"format": 1, "source": {"model_file": SANA}}))
    (path / "checkpoint.pt").write_bytes(b"weights of a week of training")
    return path


@pytest.mark.parametrize("args, message", [
    (["--schedule", "bogus"], "--schedule bogus"),
    (["--include", "("], "not a valid regular expression"),
    (["--layer-bits", "fc[=8"], "not a valid regular expression"),
    (["--cuda-graphs"], "--cuda-graphs"),
    (["--preset", "nope"], "nope"),
])
def test_train_force_checks_everything_before_deleting(tmp_path, args, message):
    run_dir = _fake_run(tmp_path / "run")
    r = run(["train", SANA, "-o", str(run_dir), "--force", "--steps", "2", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert (run_dir / "checkpoint.pt").read_bytes() == b"weights of a week of training"


def test_train_force_with_a_missing_model_file_keeps_the_run(tmp_path):
    run_dir = _fake_run(tmp_path / "run")
    r = run(["train", str(tmp_path / "typo.py"), "-o", str(run_dir), "--force", "--steps", "2"])
    assert r.exit_code == 2 and "does not exist" in r.output
    assert (run_dir / "checkpoint.pt").is_file()


def test_train_force_refuses_a_directory_that_is_no_run(tmp_path):
    mine = _user_dir(tmp_path / "mine")
    r = run(["train", SANA, "-o", str(mine), "--force", "--steps", "2"])
    assert r.exit_code == 2 and "fbqc run" in r.output
    assert (mine / "notes.txt").is_file()


def test_train_force_replaces_a_real_run(tmp_path):
    run_dir = tmp_path / "run"
    base = ["train", SANA, "-o", str(run_dir), "--steps", "2", "-q", "--schedule", "8:1,4:1"]
    assert run(base).exit_code == 0
    assert run(base).exit_code == 2                                  # exists: --resume or --force
    log_before = (run_dir / "log.jsonl").read_text()
    r = run([*base, "--force", "--lr", "1e-3"])
    assert r.exit_code == 0, r.output
    assert json.loads((run_dir / "run.json").read_text())["train"]["lr"] == 1e-3
    assert (run_dir / "log.jsonl").read_text() != log_before


def test_export_diffusers_force_refuses_a_user_directory(tmp_path):
    from fbqc.outputs import OutputError, check_writable

    mine = _user_dir(tmp_path / "mine")
    with pytest.raises(OutputError, match="fbqc diffusers directory"):
        check_writable(mine, True, "diffusers")
    assert (mine / "notes.txt").is_file()


# ---- non-finite outputs --------------------------------------------------------------------------

NONFINITE_MODEL = textwrap.dedent('''
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))])
            with torch.no_grad():
                self.blocks[0][0].weight.copy_(torch.diag(torch.tensor([1e-4, 10.0, -10.0, 5.0])))

        def forward(self, x):
            return 1.0 / self.blocks[0](x)      # the tiny first output quantizes to exactly 0

    def model():
        return M().eval()

    def example_inputs():
        return {"x": torch.tensor([[1.0, 1.0, 1.0, -1.0]])}

    def calibration_data():
        while True:
            yield example_inputs()
''')


def test_nonfinite_quantized_output_fails_compile_naming_where(tmp_path):
    f = tmp_path / "inf_model.py"
    f.write_text(NONFINITE_MODEL)
    out = tmp_path / "out"
    r = run(["compile", str(f), "-o", str(out), "--calib-samples", "2", "-q"])
    assert r.exit_code == 2, r.output
    assert "fake-quant model's output 0 is not finite" in r.output
    assert "node reciprocal" in r.output and "downstream of quantized layer blocks.0.0" in r.output
    assert not out.exists()


def test_verify_never_agrees_with_nonfinite_numbers(tmp_path, compiled, monkeypatch):
    import torch

    from fbqc.reference import Reference      # what a loaded cpu artifact is: the integer reference

    art, _ = compiled("sana", 8.0)
    assert run(["verify", str(art)]).exit_code == 0
    loaded_cls = Reference
    real_run = loaded_cls.run

    def inf_run(self, inputs):
        outs = real_run(self, inputs)
        outs[0] = outs[0].contiguous().clone()
        outs[0].view(-1)[0] = float("inf")
        return outs

    monkeypatch.setattr(loaded_cls, "run", inf_run)
    r = run(["verify", str(art)])
    assert r.exit_code == 1
    assert "NON-FINITE" in r.output and "DISAGREE" in r.output and "\nAGREE" not in r.output
    js = run(["verify", str(art), "--json"])
    assert json.loads(js.output)["summary"]["exact"] is False
    assert torch.isinf(torch.tensor(json.loads(js.output)["end_to_end_vs_float"][0]["max_abs"]))


def test_a_nonfinite_sampled_block_output_is_no_agreement():
    """A NaN in any output comparison — a sampled htp block's, the emitted C's — fails the verdict too,
    not only the model's own end-to-end rows."""
    from fbqc.artifact_verify import _no_agreement_with_nonfinite

    def result(block_finite):
        return {"summary": {"exact": True, "passed": True}, "per_layer": [{"layer": "a", "exact": 1.0}],
                "end_to_end_vs_cpu": [{"output": 0, "finite": True}],
                "blocks": {"per_block": [{"block": "transformer_blocks.0",
                                          "vs_cpu": [{"output": 0, "finite": True},
                                                     {"output": 1, "finite": block_finite}]}]}}

    ok = _no_agreement_with_nonfinite(result(True))
    assert ok["summary"]["passed"] and "nonfinite" not in ok
    bad = _no_agreement_with_nonfinite(result(False))
    assert bad["nonfinite"] == ["blocks.per_block.0.vs_cpu[1]"]
    assert bad["summary"]["passed"] is False and bad["summary"]["exact"] is False


# ---- one writer; stale temporary directories -----------------------------------------------------

def test_a_second_writer_gets_a_clear_error(tmp_path):
    out = tmp_path / "art"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from fbqc.outputs import output_lock\n"
         f"with output_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run(["compile", SANA, "-o", str(out), "-q"])
        assert r.exit_code == 2 and "another fbqc process is writing" in r.output
        r = run(["train", SANA, "-o", str(out), "--steps", "1", "-q"])
        assert r.exit_code == 2 and "another fbqc process is writing" in r.output
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_stale_staging_of_a_killed_run_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "art"
    stale = tmp_path / ".art.abc123.tmp"
    stale.mkdir()
    (stale / ".fbqc-staging").write_text(str(dead.pid))
    (stale / "model.bin").write_bytes(b"x" * 1000)
    foreign = tmp_path / ".art.users-own.tmp"            # no staging mark: not fbqc's, kept
    foreign.mkdir()
    r = run(["compile", SANA, "-o", str(out), "--calib-samples", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert not stale.exists() and foreign.is_dir()
    assert not (out / ".fbqc-staging").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask


# ---- signals ---------------------------------------------------------------------------------------

def _wait_for(predicate, proc, seconds=120):
    import time

    t = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < seconds, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(15, 143), (2, 130)])
def test_train_saves_a_checkpoint_on_sigterm_and_sigint(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fbqc.cli", "train", SANA, "-o", str(run_dir), "--steps",
                             "400", "--checkpoint-every", "1000", "--schedule", "8:1,4:1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "log.jsonl"
    _wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "checkpoint saved at step" in err and f"--resume {run_dir}" in err and "Traceback" not in err
    import torch

    step = torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]
    assert 3 <= step < 200                                   # before the bit change's checkpoint
    assert len(log.read_text().splitlines()) >= step
    r = run(["train", "--resume", str(run_dir), "--stop-after", str(step + 2), "-q"])
    assert r.exit_code == 0, r.output
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == step + 2


def test_sigterm_during_compile_leaves_no_temporary_directory(tmp_path):
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "fbqc.cli", "compile", SANA, "-o", str(out),
                             "--calib-samples", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / ".art.fbqc-lock").exists(), proc)
    import time

    time.sleep(3)                                            # inside calibration
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no artifact, no temp dir, no lock


# ---- the C emitter and non-tensor input leaves ----------------------------------------------------

def test_emit_c_takes_pixart_sigmas_real_call_signature(tmp_path):
    f = tmp_path / "pixart_real.py"
    f.write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(example("pixart_sigma").parent)!r})
        import pixart_sigma as px

        def model():
            return px.model()

        def example_inputs():            # as PixArtSigmaPipeline calls the transformer below 1024 px
            return {{**px.example_inputs(), "added_cond_kwargs": {{"resolution": None, "aspect_ratio": None}}}}
    '''))
    out = tmp_path / "out"
    r = run(["compile", str(f), "-o", str(out), "--emit-c", "--calib-samples", "2", "-q"])
    assert r.exit_code == 0, r.output
    names = [i["name"] for i in json.loads((out / "manifest.json").read_text())["backend"]["c"]["inputs"]]
    assert "added_cond_kwargs_resolution" not in names and "timestep" in names   # None leaves: no C input
    r = run(["verify", str(out)])
    assert r.exit_code == 0, r.output
    assert "C AGREES" in r.output


# ---- messages --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["nomatch=8", "fc1=8=9"])
def test_layer_bits_patterns_that_match_nothing_are_errors(tmp_path, flag):
    r = run(["compile", SANA, "-o", str(tmp_path / "o"), "--layer-bits", flag, "-q"])
    assert r.exit_code == 2 and "matches no linear or 1x1 conv layer" in r.output
    assert flag.rpartition("=")[0] in r.output


def test_invalid_regex_is_reported_before_export(tmp_path, monkeypatch):
    import fbqc.pipeline

    def no_export(*a, **k):
        raise AssertionError("exported before the regex was checked")

    monkeypatch.setattr(fbqc.pipeline, "export_model_file", no_export)
    r = run(["compile", SANA, "-o", str(tmp_path / "o"), "--include", "blocks[", "-q"])
    assert r.exit_code == 2 and "--include 'blocks[' is not a valid regular expression" in r.output


def test_damaged_manifests_and_missing_files_are_named(tmp_path, compiled):
    import shutil

    art, _ = compiled("sana", 8.0)
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    m = json.loads((bad / "manifest.json").read_text())
    del m["layers"]
    (bad / "manifest.json").write_text(json.dumps(m))
    r = run(["inspect", str(bad)])
    assert r.exit_code == 2 and "manifest.json: the manifest has no 'layers'" in r.output
    (bad / "manifest.json").write_bytes(b"\xff\xfe garbage")
    r = run(["verify", str(bad)])
    assert r.exit_code == 2 and str(bad / "manifest.json") in r.output and "damaged" in r.output
    shutil.rmtree(bad)
    shutil.copytree(art, bad)
    (bad / "program.pt2").unlink()
    r = run(["inspect", str(bad)])
    assert r.exit_code == 1 and "DAMAGED: program.pt2" in r.output


def test_run_stopped_before_its_first_checkpoint_says_force(tmp_path):
    run_dir = tmp_path / "run"
    assert run(["train", SANA, "-o", str(run_dir), "--steps", "2", "-q"]).exit_code == 0
    (run_dir / "checkpoint.pt").unlink()                    # as if killed before its first checkpoint
    r = run(["train", "--resume", str(run_dir)])
    assert r.exit_code == 2 and "before its first checkpoint" in r.output and "--force" in r.output
    r = run(["train", SANA, "-o", str(run_dir), "--steps", "2"])
    assert r.exit_code == 2 and "holds no checkpoint" in r.output and "--force" in r.output


def test_resume_accepts_the_runs_own_flags_and_prints_one_summary(tmp_path):
    run_dir = tmp_path / "run"
    base = ["train", SANA, "-o", str(run_dir), "--steps", "4", "--schedule", "8:1,4:1", "--lr", "1e-4"]
    assert run([*base, "--stop-after", "2", "-q"]).exit_code == 0
    r = run(["train", "--resume", str(run_dir), "--lr", "1e-3"])
    assert r.exit_code == 2 and "drop --lr" in r.output
    r = run(["train", "--resume", str(run_dir), "--lr", "1e-4", "--bits", "4", "--schedule", "8:1,4:1"])
    assert r.exit_code == 0, r.output
    assert r.output.count("final loss") == 1


def test_train_flags_have_help_and_redirected_output_has_no_progress_bars(tmp_path):
    text = run(["train", "--help"]).output
    for flag, words in (("--lr", "learning rate"), ("--weight-decay", "weight decay"), ("--seed", "Seed")):
        assert words in text.split(f"\n  {flag} ", 1)[1][:300], flag
    r = subprocess.run([sys.executable, "-m", "fbqc.cli", "compile", SANA, "-o", str(tmp_path / "o"),
                        "--calib-samples", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr and "calibration: 4 samples" in r.stderr


def test_ctrl_c_while_importing_is_one_line(tmp_path):
    """The ``fbqc`` script spends its first seconds importing torch: Ctrl-C there exits 130, no traceback."""
    import signal
    import time

    script = Path(sys.executable).parent / "fbqc"
    if not script.is_file():
        pytest.skip("no fbqc console script beside this python")
    for delay in (0.3, 0.6, 1.0, 1.5, 2.0):       # torch, then click and the CLI modules being imported
        proc = subprocess.Popen([str(script), "compile", SANA, "-o", str(tmp_path / "o")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (130, -2) and "Traceback" not in err, (delay, err)
        assert "interrupted" in err
        assert not (tmp_path / "o").exists()


def test_an_interrupt_python_cannot_propagate_is_delivered_again(capsys):
    """A Ctrl-C that lands in a weakref / import-lock callback is 'ignored' by Python (a traceback on
    stderr, the command goes on); fbqc delivers it again, so it ends the command as a KeyboardInterrupt."""
    import signal
    import time
    import weakref

    from fbqc import signals

    old_int, old_term, old_hook = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook
    try:
        signals.install()

        class Obj:
            pass

        obj = Obj()
        ref = weakref.ref(obj, lambda _: signals._raise(signal.SIGINT, None))     # the handler, in a callback
        with pytest.raises(KeyboardInterrupt):
            del obj
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5:     # the re-delivered signal's handler runs between bytecodes
                pass
        assert ref() is None and signals.received == signal.SIGINT
        assert "Traceback" not in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        sys.unraisablehook = old_hook
        signals.received = None
