"""Captured teacher trajectories as data (fbqc.captured_data): `fbqc compile --calib-data`, `fbqc train
--data [--teacher-cache]`, the evenly spread calibration selection, and the manifest telling how many
calibration samples were really used (issue 16, item 5)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fbqc.capture import weights_sha256
from fbqc.captured_data import CapturedTraining, Selector, TARGET
from fbqc.cli import main
from fbqc.frontend import load_model_file
from fbqc.trajectories import FORMAT, KIND, Record, Trajectories, write_json_atomic, write_prompt
from test_qat_toy import one_thread

MODEL = '''
import torch

TOKENS = 4

class Toy(torch.nn.Module):
    """A DiT-shaped toy: latent tokens, a text condition, a timestep; blocks.N linears are quantized."""
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Linear(8, 16)
        self.text = torch.nn.Linear(6, 16)
        self.blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
             for _ in range(2)])
        self.proj_out = torch.nn.Linear(16, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None,
                return_dict=True):
        h = self.embed(hidden_states) + self.text(encoder_hidden_states).mean(1, keepdim=True)
        h = h * torch.cos(timestep / 700.0)[:, None, None]
        for b in self.blocks:
            h = h + b(h)
        out = self.proj_out(h)
        return (out,) if not return_dict else {"sample": out}

def model():
    return Toy().eval()

def example_inputs():
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, TOKENS, 8, generator=g),
            "encoder_hidden_states": torch.randn(1, 3, 6, generator=g), "timestep": torch.tensor([500.0])}
'''

THREE = '''

def calibration_data():
    g = torch.Generator().manual_seed(5)
    return [{"hidden_states": torch.randn(1, TOKENS, 8, generator=g),
             "encoder_hidden_states": torch.randn(1, 3, 6, generator=g),
             "timestep": torch.tensor([100.0 * i])} for i in range(3)]
'''


def model_file(directory: Path, extra: str = "") -> Path:
    path = directory / ("toy3.py" if extra else "toy.py")
    path.write_text(MODEL + extra)
    return path


def make_capture(directory: Path, model_path: Path, prompts=3, steps=5, tokens=4, mask_zero=False) -> Path:
    """A capture as `fbqc capture` writes it: records with more keys than the program takes (a mask of
    ones, return_dict, added_cond_kwargs of None), outputs = the float model's outputs."""
    m = load_model_file(model_path).call("model")
    entries = []
    for p in range(prompts):
        g = torch.Generator().manual_seed(100 + p)
        text = {b: torch.randn(1, 3, 6, generator=g) for b in ("uncond", "cond")}
        mask = torch.ones(1, 3)
        if mask_zero:
            mask[0, -1] = 0
        x = torch.randn(1, tokens, 8, generator=g)
        rows = []
        for s in range(steps):
            t = torch.tensor([1000.0 * (1 - s / steps)])
            row = {}
            for b in ("uncond", "cond"):
                inputs = {"hidden_states": x.clone(), "encoder_hidden_states": text[b].clone(),
                          "timestep": t.clone(), "encoder_attention_mask": mask.clone()}
                with torch.no_grad():
                    row[b] = {"inputs": inputs, "output": m(**inputs, return_dict=False)[0]}
            rows.append(row)
            x = x - 0.2 * row["cond"]["output"]
        entries.append(write_prompt(directory, p, {"prompt": f"prompt {p}", "seed": p}, rows, x))
    write_json_atomic(directory / "manifest.json", {
        "kind": KIND, "format": FORMAT, "prompts": entries, "model": {"weights_sha256": weights_sha256(m)},
        "call": {"static": {"return_dict": False, "added_cond_kwargs.resolution": None}}})
    return directory


def fbqc(*args: str) -> dict:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_evenly_spreads_over_steps_prompts_and_branches():
    class Fake(Trajectories):
        def __init__(self, P, S, B):
            self.prompts = [{"index": i, "steps": S, "branches": B} for i in range(P)]
            self._records = [Record(p["index"], s, b, None) for p in self.prompts for s in range(S) for b in B]

    for P, S, B in [(4, 10, ["uncond", "cond"]), (5, 20, ["uncond", "cond"]), (3, 7, ["cond"])]:
        t = Fake(P, S, B)
        assert sorted(t.evenly(len(t))) == list(range(len(t)))          # everything, once
        assert sorted(t.evenly(10 * len(t))) == list(range(len(t)))     # never more than there is
        few = [t.record(i).step for i in t.evenly(3)]
        assert max(few) - min(few) >= S // 2                           # 3 samples span the schedule
        rs = [t.record(i) for i in t.evenly(2 * S)]
        assert set(Counter(r.step for r in rs).values()) == {2}         # each step twice
        assert len({r.prompt for r in rs}) == P                         # every prompt
        if len(B) == 2:                                                 # both branches, at each step
            assert Counter(r.branch for r in rs) == {b: S for b in B}
            assert all({r.branch for r in rs if r.step == s} == set(B) for s in range(S))


def test_compile_calib_data_records_the_selection_and_uses_it(tmp_path):
    toy = model_file(tmp_path)
    cap = make_capture(tmp_path / "cap", toy)
    with one_thread():
        fbqc("compile", str(toy), "-o", str(tmp_path / "free"), "--calib-samples", "8", "-q")
        fbqc("compile", str(toy), "-o", str(tmp_path / "cap_out"), "--calib-samples", "12",
             "--calib-data", str(cap), "-q")
    cal = manifest(tmp_path / "cap_out")["calibration"]
    assert cal["samples"] == cal["requested"] == 12 and "warnings" not in cal
    sel = cal["selection"]
    assert sel["records"] == 12 and sel["prompts"] == [0, 1, 2] and sel["steps"] == [0, 1, 2, 3, 4]
    assert sel["branches"] == ["cond", "uncond"] and len(sel["indices"]) == 12
    assert sel["weights_sha256"] and sel["manifest_sha256"] and "captured" in cal["data"]
    assert "dropped_inputs" not in cal                  # mask of ones, return_dict, None: neutral
    free = {r["layer"]: r["x_scale"] for r in manifest(tmp_path / "free")["layers"]}
    ours = {r["layer"]: r["x_scale"] for r in manifest(tmp_path / "cap_out")["layers"]}
    assert free.keys() == ours.keys() and all(free[k] != ours[k] for k in free)    # the data is used
    assert manifest(tmp_path / "free")["calibration"]["samples"] == 8


def test_calib_data_of_another_resolution_is_one_clear_line(tmp_path):
    toy = model_file(tmp_path)
    cap = make_capture(tmp_path / "cap", toy, prompts=1, steps=2, tokens=6)
    r = CliRunner().invoke(main, ["compile", str(toy), "-o", str(tmp_path / "o"), "--calib-data", str(cap), "-q"])
    assert r.exit_code == 2
    line = r.output.strip().splitlines()[-1]
    assert "'hidden_states'" in line and "(1, 6, 8)" in line and "(1, 4, 8)" in line and str(cap) in line
    assert "fbqc capture" in line and not (tmp_path / "o").exists()


def test_dropped_inputs_that_matter_are_warned_once_and_recorded(tmp_path):
    toy = model_file(tmp_path)
    cap = make_capture(tmp_path / "cap", toy, prompts=2, steps=2, mask_zero=True)
    t = Trajectories(cap)
    seen = []
    sel = Selector(t, load_model_file(toy).call("example_inputs"), "--data", seen.append)
    for i in range(len(t)):
        assert set(sel(i)) == {"hidden_states", "encoder_hidden_states", "timestep"}
    assert list(sel.dropped) == ["encoder_attention_mask"] and len(seen) == 1


def test_calibration_data_that_runs_out_is_recorded_truthfully(tmp_path):
    """Issue 16 item 5: calibration_data() yields 3 samples, --calib-samples 100 → the manifest says 3."""
    toy = model_file(tmp_path, THREE)
    with one_thread():
        r = fbqc("compile", str(toy), "-o", str(tmp_path / "o"), "--calib-samples", "100")
    cal = manifest(tmp_path / "o")["calibration"]
    assert cal["samples"] == 3 and cal["requested"] == 100
    warning = "calibration_data() yielded 3 samples, fewer than --calib-samples 100"
    assert cal["warnings"] == [warning] and warning in r.output


def _train_losses(toy: Path, cap: Path, cached: bool) -> tuple[list[float], int]:
    from fbqc.pipeline import CompileOptions
    from fbqc.qat.model_file import prepare
    from fbqc.qat.train import train

    teacher, student, mf, scheduled, _ = prepare(toy, CompileOptions(bits=4))
    calls = []

    def counting_teacher(**x):
        calls.append(1)
        return teacher.graph_module(**x)

    data = CapturedTraining(Selector(Trajectories(cap), teacher.example_inputs, "--data"), seed=3,
                            targets=cached)
    result = train(student, counting_teacher, data, schedule="8:1,4:2", steps=6, lr=1e-2, seed=3,
                   scheduled_layers=scheduled, progress=False, report=False, teacher_cache=cached,
                   data_dir=str(cap) if cached else None)
    return [row["loss"] for row in result.log], len(calls)


def test_teacher_cache_gives_the_live_teachers_losses_without_a_teacher(tmp_path):
    toy = model_file(tmp_path)
    cap = make_capture(tmp_path / "cap", toy)
    with one_thread():
        live, live_calls = _train_losses(toy, cap, cached=False)
        cached, cached_calls = _train_losses(toy, cap, cached=True)
    assert live_calls == 6 and cached_calls == 0
    assert len(live) == len(cached) == 6 and len(set(live)) > 1
    assert cached == pytest.approx(live, rel=1e-5, abs=1e-9)


def test_train_data_cli_records_the_data_and_resume_keeps_it(tmp_path):
    toy = model_file(tmp_path)
    cap = make_capture(tmp_path / "cap", toy, prompts=2, steps=3)
    run = tmp_path / "run"
    common = ["--schedule", "8:1,4:2", "--lr", "1e-3", "-q", "--json"]
    with one_thread():
        fbqc("train", str(toy), "--data", str(cap), "--teacher-cache", "--steps", "6", "-o", str(run),
             "--stop-after", "3", *common[:-1])
        r = json.loads((run / "run.json").read_text())
        assert r["train"]["data_dir"] == str(cap.resolve()) and r["train"]["teacher_cache"] is True
        assert r["source"]["capture"]["records"] == 12 and r["source"]["capture"]["teacher_cache"] is True
        assert "captured teacher trajectories" in r["data"]
        bad = CliRunner().invoke(main, ["train", "--resume", str(run), "--data", str(tmp_path)])
        assert bad.exit_code == 2 and "--data" in bad.output
        fbqc("train", "--resume", str(run), "-q")                    # keeps the run's data
        assert len((run / "log.jsonl").read_text().splitlines()) == 6
        nocap = CliRunner().invoke(main, ["train", str(toy), "--teacher-cache", "-o", str(tmp_path / "x")])
        assert nocap.exit_code == 2 and "needs --data" in nocap.output
        fbqc("compile", str(run), "-o", str(tmp_path / "o"), "--calib-data", str(cap), "--calib-samples", "4", "-q")
    cal = manifest(tmp_path / "o")["calibration"]
    assert cal["samples"] == 4 and cal["selection"]["capture"] == str(cap)


def test_two_processes_read_disjoint_records_of_the_global_batch(tmp_path):
    toy = model_file(tmp_path)
    cap = make_capture(tmp_path / "cap", toy, prompts=2, steps=3)
    env = dict(os.environ, OMP_NUM_THREADS="1", FBQC_DATA_TRACE=str(tmp_path / "trace"))
    p = subprocess.run([sys.executable, "-m", "fbqc.cli", "train", str(toy), "--data", str(cap), "--teacher-cache",
                        "--nproc", "2", "--batch", "4", "--schedule", "8:1,4:2", "--steps", "3", "--lr", "1e-3",
                        "-o", "two", "-q", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["processes"] == 2
    reads = {r: [tuple(map(int, line.split()[1:])) for line in (tmp_path / f"trace.{r}").read_text().splitlines()
                 if line.startswith("read ")] for r in (0, 1)}                  # "read INDEX RECORD" per read
    for rank, rows in reads.items():
        assert rows and all((i % 4) // 2 == rank for i, _ in rows)              # only its own share
    used = {r: {i for i, _ in rows if i < 12} for r, rows in reads.items()}     # 3 steps × batch 4
    assert not used[0] & used[1] and used[0] | used[1] == set(range(12))
    data = CapturedTraining(Selector(Trajectories(cap), {}, "--data"), seed=0)
    assert all(rec == data.record_index(i) for rows in reads.values() for i, rec in rows)
    assert sorted(data.record_index(i) for i in range(12)) == list(range(12))  # one epoch = every record


def test_a_capture_of_other_weights_is_warned_and_recorded(tmp_path):
    toy = model_file(tmp_path)
    cap = make_capture(tmp_path / "cap", toy, prompts=1, steps=2)
    m = json.loads((cap / "manifest.json").read_text())
    m["model"]["weights_sha256"] = "0" * 64
    write_json_atomic(cap / "manifest.json", m)
    with one_thread():
        r = fbqc("compile", str(toy), "-o", str(tmp_path / "o"), "--calib-data", str(cap), "--calib-samples", "4")
    cal = manifest(tmp_path / "o")["calibration"]
    assert cal["samples"] == 4 and any("captured with different weights" in w for w in cal["warnings"])
    assert "captured with different weights" in r.output
