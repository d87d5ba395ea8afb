"""fbqc capture: teacher trajectories of the four tiny pipelines (issue 15 part 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import ARCHS, example
from fbqc.capture import capture, default_prompts, prompt_seed, read_prompts
from fbqc.cli import main
from fbqc.errors import UserError
from fbqc.frontend import load_model_file
from fbqc.recorder import Recorder
from fbqc.trajectories import Trajectories, flatten_kwargs

PROMPTS = ["a red cube on a blue sphere", "# a comment", "", "two cats on a windowsill", "a lighthouse"]
STEPS = 2


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def shards(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.glob("*/*")) if p.suffix != ".tmp"}


def has_pipeline(arch: str) -> bool:
    return "def pipeline(" in example(arch).read_text()


def test_prompt_file_and_seeds(prompts, tmp_path):
    assert read_prompts(prompts) == ["a red cube on a blue sphere", "two cats on a windowsill", "a lighthouse"]
    assert prompt_seed(0, "a") == prompt_seed(0, "a") != prompt_seed(1, "a")
    assert 0 <= prompt_seed(3, "x") < 2 ** 63
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    for path, msg in ((tmp_path / "empty.txt", "holds no prompt"), (tmp_path / "none.txt", "does not exist")):
        with pytest.raises(UserError, match=msg):
            capture(example("sana"), path, tmp_path / "o")
    calib = read_prompts(default_prompts(example("sana")))           # the default --prompts of the examples
    evals = read_prompts(example("sana").parent / "prompts" / "eval.txt")
    assert len(calib) == len(set(calib)) == 128 and len(evals) >= 16 and not set(calib) & set(evals)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_records_replay_and_resume(arch, prompts, tmp_path, monkeypatch):
    if not has_pipeline(arch):
        pytest.skip(f"examples/{arch}.py has no pipeline() yet")
    a = tmp_path / "a"
    r = capture(example(arch), prompts, a, num_prompts=2, steps=STEPS)
    m = json.loads((a / "manifest.json").read_text())
    branches = m["branches"]
    assert branches in (["uncond", "cond"], ["cond"])
    assert r["complete"] and r["records"] == m["records"] == STEPS * len(branches) * 2
    assert m["kind"] == "fbqc-capture" and m["steps"] == STEPS and len(m["model"]["weights_sha256"]) == 64
    assert [e["prompt"] for e in m["prompts"]] == read_prompts(prompts)[:2]
    t = Trajectories(a)
    assert len(t) == r["records"]
    for e in m["prompts"]:                      # text embeddings stored once per prompt, not per step
        assert "encoder_hidden_states" in e["per_prompt"] and "hidden_states" not in e["per_prompt"]
        assert t.final_latents(e["index"]).shape[0] == 1 and t.image_path(e["index"]).is_file()

    # records' inputs are what example_inputs() describes (shapes, dtypes), and replay to the target
    mf = load_model_file(example(arch))
    want, _ = flatten_kwargs(mf.call("example_inputs"))
    pipe = mf.call("pipeline")
    for i in (0, len(t) - 1):
        kw = t[i]
        got, _ = flatten_kwargs(kw)
        for k, v in want.items():
            assert (got[k].shape, got[k].dtype) == (v.shape, v.dtype), (arch, k)
        with torch.no_grad():
            out = pipe.transformer(**kw)
        out = out[0] if isinstance(out, tuple) else out.sample
        torch.testing.assert_close(out, t.target(i), rtol=1e-4, atol=1e-5)

    # interrupted in the middle of prompt 1 (with a torn shard left behind), then rerun: same bytes
    b = tmp_path / "b"
    hook, calls = Recorder._hook, []

    def dying(self, *args):
        calls.append(1)
        if len(calls) == STEPS + 2:                # the second transformer call of prompt 1
            raise KeyboardInterrupt
        return hook(self, *args)
    monkeypatch.setattr(Recorder, "_hook", dying)
    with pytest.raises(KeyboardInterrupt):
        capture(example(arch), prompts, b, num_prompts=2, steps=STEPS)
    monkeypatch.setattr(Recorder, "_hook", hook)
    assert sorted(p.name for p in (b / "shards").iterdir()) == ["00000.json", "00000.safetensors"]
    (b / "shards" / ".00001.safetensors.tmp").write_bytes(b"torn")
    assert not json.loads((b / "manifest.json").read_text())["complete"]
    r2 = capture(example(arch), prompts, b, num_prompts=2, steps=STEPS)
    assert r2["prompts_this_run"] == 1 and r2["complete"]
    assert shards(b) == shards(a)


@pytest.mark.skipif(not has_pipeline("sana"), reason="examples/sana.py has no pipeline() yet")
def test_cli_capture_dry_run_force_and_resume(prompts, tmp_path):
    run = lambda *args: CliRunner().invoke(main, [str(a) for a in args])  # noqa: E731
    base = (example("sana"), "--prompts", prompts, "--steps", STEPS, "--num-prompts", 2)
    c = tmp_path / "c"
    res = run("capture", *base, "-o", c, "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["status"] == "captured" and s["records"] == 2 * STEPS * 2 and s["bytes"] > 0
    d = tmp_path / "d"                                        # a second capture: byte-identical shards
    assert capture(example("sana"), prompts, d, num_prompts=2, steps=STEPS)["complete"]
    assert shards(c) == shards(d)
    res = run("capture", *base, "-o", c)                      # complete: just reported
    assert res.exit_code == 0 and "already complete" in res.output
    res = run("capture", *base[:-1], 3, "-o", c, "--quiet")   # more prompts: continues
    assert res.exit_code == 0 and "captured 1 prompt" in res.output and "3 of 3" in res.output
    res = run("capture", *base, "--guidance", 2.0, "-o", c)   # other settings: refused
    assert res.exit_code == 2 and "other settings" in res.output and "guidance_scale" in res.output

    dry = tmp_path / "dry"
    res = run("capture", *base, "-o", dry, "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    est = json.loads(res.output)
    assert not dry.exists() and est["records_per_prompt"] == STEPS * 2
    actual = sum(len(v) for k, v in shards(d).items() if k.startswith(("shards/00000.s", "images/00000")))
    assert abs(est["bytes_per_prompt"] - actual) < 0.02 * actual and est["bytes_total"] == 2 * est["bytes_per_prompt"]
    res = run("capture", *base, "--dry-run")
    assert res.exit_code == 0 and "bytes per prompt" in res.output and "per transformer call" in res.output

    foreign = tmp_path / "foreign"                            # --force never deletes what is not a capture
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for extra in ((), ("--force",)):
        res = run("capture", *base, "-o", foreign, *extra)
        assert res.exit_code == 2 and "is not an fbqc capture; choose another -o" in res.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (c / "keep.txt").write_text("mine")                       # --force on a capture: replaced, extras kept
    res = run("capture", *base, "--steps", 3, "-o", c, "--force", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["records"] == 2 * 3 * 2 and (c / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (c / "shards").iterdir())[-1] == "00001.safetensors"


def test_errors_name_the_fix(prompts, tmp_path):
    bare = tmp_path / "bare.py"
    bare.write_text("import torch\ndef model(**o):\n    return torch.nn.Linear(2, 2)\n"
                    "def example_inputs(**o):\n    return {'input': torch.zeros(1, 2)}\n")
    res = CliRunner().invoke(main, ["capture", str(bare), "--prompts", str(prompts), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "define pipeline(**opts) -> diffusers.DiffusionPipeline" in res.output
    assert not (tmp_path / "x").exists()
    if not has_pipeline("sana"):
        return
    nan = tmp_path / "nan_sana.py"                            # a teacher that outputs NaN: named error
    nan.write_text(f"import sys, torch\nsys.path.insert(0, {str(example('sana').parent)!r})\n"
                   "from sana import model, example_inputs, generation_defaults, pipeline as _p\n"
                   "def pipeline(preset='tiny', checkpoint=None):\n    pipe = _p(preset, checkpoint)\n"
                   "    pipe.transformer.proj_out.bias.data.fill_(float('nan'))\n    return pipe\n")
    with pytest.raises(UserError, match=r"prompt 0 .* step 0: the teacher transformer's output contains NaN"):
        capture(nan, prompts, tmp_path / "n", num_prompts=1, steps=STEPS)


def test_capture_killed_with_sigkill_resumes_to_the_same_bytes(tmp_path):
    """A real kill (SIGKILL: no cleanup at all) after some prompts; the same command again finishes the
    capture, and its shards and images equal an uninterrupted capture's."""
    import signal
    import subprocess
    import sys
    import time

    calib = default_prompts(example("sana"))
    cmd = [sys.executable, "-m", "fbqc.cli", "capture", str(example("sana")), "--prompts", str(calib),
           "--num-prompts", "12", "--steps", "3", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "-o", str(killed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t = time.time()
    while not (killed / "shards" / "00003.json").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < 120
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(json.loads((killed / "manifest.json").read_text())["prompts"]) < 12
    r = subprocess.run([*cmd, "-o", str(killed)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    whole = tmp_path / "whole"
    assert subprocess.run([*cmd, "-o", str(whole)], capture_output=True).returncode == 0
    assert shards(killed) == shards(whole) and len(shards(whole)) == 36        # 12 × (shard, entry, image)
    assert json.loads((killed / "manifest.json").read_text())["complete"] is True
