"""fbqc.qat.bit_change: the remedies at a bit change (--moments, --rewarm), the change rows, report(),
the weight-code diagnostics, and the flags."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import fbqc
import fbqc.qat
from fbqc.cli import main
from fbqc.passes import AnnotateLinears, InsertFakeQuant
from fbqc.qat import bit_change as BC
from fbqc.qat.rundir.checkpoint import RunError
from test_qat_toy import QUIET, toy_file

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    path = toy_file(d)
    teacher, mf = fbqc.export_model_file(path)
    return teacher, mf, path


def student(teacher):
    return fbqc.PassManager([AnnotateLinears(4.0), InsertFakeQuant()])(teacher)


def train(toy, **kw):
    teacher, mf, _ = toy
    s = kw.pop("program", None) or student(teacher)
    return fbqc.qat.train(s, teacher, lambda: mf.call("training_data"), **QUIET, **kw)


# --- --moments on a real optimizer ------------------------------------------------------------------

def _adamw_with_state(impl: dict, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, **impl)
    for _ in range(3):
        p.grad = torch.randn(5, 3, generator=g)
        opt.step()
    return p, opt, g


IMPLS = [{"foreach": False}, {"foreach": True}, {"fused": True}]


@pytest.mark.parametrize("impl", IMPLS, ids=["for-loop", "foreach", "fused"])
def test_reset_makes_the_next_update_a_fresh_adamws(impl):
    p, opt, g = _adamw_with_state(impl)
    step_before = opt.state[p]["step"]
    BC.apply_moments(opt, "reset")
    st = opt.state[p]
    assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    assert st["step"] is step_before and float(st["step"]) == 0.0           # the same tensor, zeroed in place
    q = torch.nn.Parameter(p.detach().clone())
    fresh = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, **impl)
    grad = torch.randn(5, 3, generator=g)
    p.grad, q.grad = grad.clone(), grad.clone()
    opt.step()
    fresh.step()
    assert torch.equal(p, q)
    assert torch.equal(opt.state[p]["exp_avg"], fresh.state[q]["exp_avg"])
    assert torch.equal(opt.state[p]["exp_avg_sq"], fresh.state[q]["exp_avg_sq"])
    # without the reset the update differs (the test can fail)
    p2, opt2, g2 = _adamw_with_state(impl)
    q2 = torch.nn.Parameter(p2.detach().clone())
    fresh2 = torch.optim.AdamW([q2], lr=1e-2, weight_decay=0.1, **impl)
    p2.grad = q2.grad = torch.randn(5, 3, generator=g2)
    opt2.step()
    fresh2.step()
    assert not torch.equal(p2, q2)


def test_momentum_zeroes_only_the_first_moment_and_keep_nothing():
    p, opt, _ = _adamw_with_state({"foreach": True})
    st = opt.state[p]
    sq, step, avg = st["exp_avg_sq"].clone(), st["step"].clone(), st["exp_avg"].clone()
    BC.apply_moments(opt, "keep")
    assert torch.equal(st["exp_avg"], avg) and torch.equal(st["exp_avg_sq"], sq) and torch.equal(st["step"], step)
    BC.apply_moments(opt, "momentum")
    assert not st["exp_avg"].any() and avg.any()
    assert torch.equal(st["exp_avg_sq"], sq) and float(st["step"]) == 3.0
    # a float step counter stays a float
    opt.state[p]["step"] = 3.0
    BC.apply_moments(opt, "reset")
    assert opt.state[p]["step"] == 0.0 and isinstance(opt.state[p]["step"], float)
    with pytest.raises(ValueError, match="--moments must be one of keep, reset, momentum"):
        BC.apply_moments(opt, "bogus")


def test_moment_stats_against_the_state():
    p, opt, _ = _adamw_with_state({"foreach": True})
    r = torch.nn.Parameter(torch.ones(4))
    opt.add_param_group({"params": [r]})
    r.grad, p.grad = torch.full((4,), 2.0), torch.ones(5, 3)
    opt.step()
    avgs = torch.cat([opt.state[x]["exp_avg"].flatten() for x in (p, r)]).double()
    sqs = torch.cat([opt.state[x]["exp_avg_sq"].flatten() for x in (p, r)]).double()
    got = BC.moment_stats(opt)
    assert got["exp_avg_norm"] == pytest.approx(float((avgs ** 2).sum() ** 0.5), rel=1e-6)
    assert got["exp_avg_sq_sqrt_mean"] == pytest.approx(float(sqs.sqrt().mean()), rel=1e-6)
    assert BC.moment_stats(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])) == \
        {"exp_avg_norm": None, "exp_avg_sq_sqrt_mean": None}


# --- in the loop ----------------------------------------------------------------------------------

def _opt_steps(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)["optimizer"]["state"]
    return {float(s["step"]) for s in state.values()}


def test_moments_in_training_and_the_change_row(toy, tmp_path):
    # 8:1,4:1 over 4 steps: the change is at the third step; reset restarts AdamW's step count there
    for mode, steps in (("keep", 4.0), ("momentum", 4.0), ("reset", 2.0)):
        r = train(toy, schedule="8:1,4:1", steps=4, lr=3e-3, moments=mode, out=tmp_path / mode)
        assert _opt_steps(tmp_path / mode) == {steps}, mode
        assert [("change" in x) for x in r.log] == [False, False, True, False]
        assert r.log[2]["change"]["from"] == 8.0 and r.log[2]["change"]["to"] == 4.0
    # the change row's statistics are those of the moments before the remedy: the checkpoint at the end
    # of the phase holds them; the resumed run applies the remedy (and logs the same row)
    first = train(toy, schedule="8:1,4:1", steps=4, lr=3e-3, moments="reset", out=tmp_path / "r", stop_after=2)
    assert not first.summary["finished"]
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["optimizer"]["state"].values()
    avgs = torch.cat([s["exp_avg"].flatten() for s in state]).double()
    sqs = torch.cat([s["exp_avg_sq"].flatten() for s in state]).double()
    resumed = train(toy, schedule="8:1,4:1", steps=4, lr=3e-3, moments="reset", out=tmp_path / "r", resume=True)
    change = resumed.log[2]["change"]
    assert change["exp_avg_norm"] == pytest.approx(float(avgs.norm()), rel=1e-6)
    assert change["exp_avg_sq_sqrt_mean"] == pytest.approx(float(sqs.sqrt().mean()), rel=1e-6)
    assert _opt_steps(tmp_path / "r") == {2.0}
    straight = [json.loads(x) for x in (tmp_path / "reset" / "log.jsonl").read_text().splitlines()]
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in x.items() if k != "seconds"} for x in log] == \
        [{k: v for k, v in x.items() if k != "seconds"} for x in straight]          # bit-exact resume
    with pytest.raises(RunError, match="changed: moments 'reset' → 'keep'"):
        train(toy, schedule="8:1,4:1", steps=4, lr=3e-3, out=tmp_path / "r", resume=True)


def test_a_run_from_before_the_settings_resumes(toy, tmp_path):
    train(toy, schedule="8:1,4:1", steps=4, lr=3e-3, out=tmp_path / "old", stop_after=1)
    run = json.loads((tmp_path / "old" / "run.json").read_text())
    del run["train"]["rewarm"], run["train"]["moments"]
    (tmp_path / "old" / "run.json").write_text(json.dumps(run))
    r = train(toy, schedule="8:1,4:1", steps=4, lr=3e-3, out=tmp_path / "old", resume=True)
    assert r.summary["finished"] and _opt_steps(tmp_path / "old") == {4.0}
    with pytest.raises(RunError, match="rewarm 0 → 2"):
        train(toy, schedule="8:1,4:1", steps=4, lr=3e-3, out=tmp_path / "old", resume=True, rewarm=2)


def test_rewarm_lr_sequence(toy):
    r = train(toy, schedule="8:1,6:1,4:1", steps=6, lr=1e-3, rewarm=2)
    assert [x["lr"] for x in r.log] == pytest.approx([1e-3, 1e-3, 5e-4, 1e-3, 5e-4, 1e-3], rel=1e-12)
    r = train(toy, schedule="8:1,6:1,4:1", steps=6, lr=1e-3, rewarm=2, warmup=3)
    warm = [1 / 3, 2 / 3, 1, 1, 1, 1]
    re = [1, 1, 0.5, 1, 0.5, 1]
    assert [x["lr"] for x in r.log] == pytest.approx([1e-3 * a * b for a, b in zip(warm, re)], rel=1e-12)
    r = train(toy, schedule="8:1,4:2", steps=9, lr=1e-3, rewarm=4)
    assert [x["lr"] for x in r.log] == pytest.approx([1e-3] * 3 + [2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 3, rel=1e-12)
    assert [x["lr"] for x in train(toy, schedule="8:1,4:2", steps=9, lr=1e-3).log] == [1e-3] * 9   # off


def test_settings_are_checked(toy):
    with pytest.raises(ValueError, match="--moments must be one of keep, reset, momentum, got 'bogus'"):
        train(toy, schedule="8:1,4:1", steps=4, moments="bogus")
    with pytest.raises(ValueError, match="--rewarm must be an integer ≥ 0"):
        train(toy, schedule="8:1,4:1", steps=4, rewarm=-1)


# --- report() ------------------------------------------------------------------------------------

def test_report_on_hand_made_rows():
    losses = [4.0, 2.0, 1.0, 3.0, 9.0, 6.0, 3.2, 3.0, 2.0, 50.0, 40.0, 30.0]
    rows = [{"step": i + 1, "bits": 8.0, "loss": x} for i, x in enumerate(losses)]
    rows[4]["change"] = {"from": 8.0, "to": 6.0, "exp_avg_norm": 0.5, "exp_avg_sq_sqrt_mean": 0.25}
    rows[9]["change"] = {"from": 6.0, "to": 4.0, "exp_avg_norm": 0.1, "exp_avg_sq_sqrt_mean": None}
    got = BC.report(rows, window=3, flips={5: {"flips_before_window": 0.125}})
    # change at step 5: before = mean(2, 1, 3) = 2; peak over steps 5..7 = 9; ≤ 2.2 first at step 9: 4 updates
    assert got[0] == {"step": 5, "from": 8.0, "to": 6.0, "loss_before": 2.0, "loss_first": 9.0, "loss_peak": 9.0,
                      "spike": 4.5, "recovery_steps": 4, "exp_avg_norm": 0.5, "exp_avg_sq_sqrt_mean": 0.25,
                      "flips_before_window": 0.125}
    # change at step 10: before = mean(3.2, 3, 2) = 2.7333; peak 50; never ≤ 3.0067 again: None
    assert got[1]["loss_before"] == pytest.approx(8.2 / 3) and got[1]["loss_peak"] == 50.0
    assert got[1]["spike"] == pytest.approx(50 / (8.2 / 3)) and got[1]["recovery_steps"] is None
    assert got[1]["loss_first"] == 50.0 and "flips_before_window" not in got[1]
    # the default window (10) takes the steps there are; a first step already back counts 0
    rows2 = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.05, "change": {"from": 8.0, "to": 4.0}},
             {"step": 3, "loss": 0.5}]
    (one,) = BC.report(rows2)
    assert one["loss_before"] == 1.0 and one["loss_peak"] == 1.05 and one["recovery_steps"] == 0
    assert json.loads(json.dumps(got)) == got                                  # JSON-safe
    assert BC.report([{"step": 1, "loss": 1.0}]) == []


def test_change_steps_and_lr_factor():
    sched = fbqc.qat.Schedule.parse("8:1,6:2,4:2", 10)
    assert BC.change_steps(sched) == [2, 6]
    try:                                        # a ramp's bits move every step: only its ends are changes
        ramp = fbqc.qat.Schedule.parse("8..6:2,4:2", 8)
    except ValueError:
        ramp = None                             # a schedule.py without ramps
    if ramp is not None:
        assert BC.change_steps(ramp) == [4] and len({ramp.bits_at(i) for i in range(4)}) == 4
    assert [BC.lr_factor(s, [2, 6], 3) for s in range(10)] == [1, 1, 1 / 3, 2 / 3, 1, 1, 1 / 3, 2 / 3, 1, 1]
    assert [BC.lr_factor(s, [2, 6], 0) for s in range(10)] == [1.0] * 10


# --- weight codes -------------------------------------------------------------------------------------

def _codes(w: torch.Tensor, bits: float) -> torch.Tensor:
    """Narrow-range codes per output channel, written out here (not through fbqc.quant_math)."""
    qmax = torch.tensor(2.0 ** (bits - 1) - 1, dtype=torch.float64).float()
    s = w.detach().float().abs().amax(dim=1, keepdim=True) / qmax
    s = torch.where(s == 0, torch.ones_like(s), s)
    hi = float(torch.floor(qmax))
    return torch.clamp(torch.round(w.detach().float() / s), -hi - 1, hi)


def test_weight_codes_and_level_flips(toy):
    teacher, _, _ = toy
    s = student(teacher)
    layers = list(fbqc.qat.bits_buffers(s))
    gm = s.graph_module
    for bits in (4.0, 5.5):
        fbqc.qat.set_bits(fbqc.qat.bits_buffers(s), layers, bits)
        got = BC.weight_codes(s)                                      # at the buffers' bits
        assert list(got) == layers
        for layer in layers:
            want = _codes(gm.get_parameter(f"{layer}.weight"), bits)
            assert got[layer].dtype == torch.int8 and torch.equal(got[layer].float(), want), (layer, bits)
    fbqc.qat.set_bits(fbqc.qat.bits_buffers(s), layers, 8.0)
    at4 = BC.weight_codes(s, bits=4.0)                                # explicit bits override the buffers
    assert all(torch.equal(at4[k].float(), _codes(gm.get_parameter(f"{k}.weight"), 4.0)) for k in layers)
    # nudge one weight across a rounding boundary: exactly that code moves
    w = gm.get_parameter("blocks.0.0.weight")
    row = w[3].detach().abs()
    j = int(row.argmin())                                             # not the channel's max: the scale stays
    step = float(row.max()) / 7
    with torch.no_grad():
        w[3, j] = 2.4 * step
        before = BC.weight_codes(s, bits=4.0)
        w[3, j] = 2.6 * step
        after = BC.weight_codes(s, bits=4.0)
    assert int(before["blocks.0.0"][3, j]) == 2 and int(after["blocks.0.0"][3, j]) == 3
    diff = {k: (before[k] != after[k]).nonzero().tolist() for k in layers}
    assert diff == {k: ([[3, j]] if k == "blocks.0.0" else []) for k in layers}
    total = sum(gm.get_parameter(f"{k}.weight").numel() for k in layers)
    assert BC.level_flips(before, after) == 1 / total
    one = BC.weight_codes(s, ["blocks.0.0"], bits=4.0)
    assert list(one) == ["blocks.0.0"] and torch.equal(one["blocks.0.0"], after["blocks.0.0"])
    assert BC.level_flips(before, before) == 0.0
    with pytest.raises(ValueError, match="other layers"):
        BC.level_flips(one, before)
    with pytest.raises(ValueError, match="not quantized layers"):
        BC.weight_codes(s, ["nope"])
    with pytest.raises(TypeError, match="module student is not supported"):
        BC.weight_codes(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("spec,steps", [("8:1,6:1,4:1", 12), ("8:1,4:1", 24)])
def test_in_loop_flips_match_snapshots_taken_here(toy, spec, steps):
    """The report's flips against codes of the weights captured here at the top of every step (the
    task-loss hook runs in the step's forward, before its update)."""
    teacher, _, _ = toy
    s = student(teacher)
    layers = list(fbqc.qat.bits_buffers(s))
    seen = []

    def capture(sample, pred):
        seen.append({k: s.graph_module.get_parameter(f"{k}.weight").detach().clone() for k in layers})
        return pred[0].sum() * 0.0

    r = train(toy, program=s, schedule=spec, steps=steps, lr=3e-3, task_loss=capture)
    seen.append({k: s.graph_module.get_parameter(f"{k}.weight").detach().clone() for k in layers})   # the end
    sched = fbqc.qat.Schedule.parse(spec, steps)

    def flips(a, b, bits):
        moved = sum(int((_codes(seen[a][k], bits) != _codes(seen[b][k], bits)).sum()) for k in layers)
        return moved / sum(seen[a][k].numel() for k in layers)

    changes = BC.change_steps(sched)
    assert [c["step"] for c in r.summary["bit_changes"]] == [c + 1 for c in changes]
    for i, (c, got) in enumerate(zip(changes, r.summary["bit_changes"])):
        old, new = sched.bits_at(c - 1), sched.bits_at(c)
        since = max(c - 10, changes[i - 1] if i else 0)
        until = min(c + 10, changes[i + 1] if i + 1 < len(changes) else steps)
        assert got["flips_before_steps"] == c - since and got["flips_after_steps"] == until - c
        assert got["flips_before_window"] == flips(since, c, old)
        assert got["flips_after_window"] == flips(c, until, new)
    assert any(c["flips_after_window"] > 0 for c in r.summary["bit_changes"])    # codes did move


# --- the command line -----------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_flags(toy, tmp_path):
    _, _, path = toy
    r = run("train", path, "--moments", "bogus", "-o", tmp_path / "x")
    assert r.exit_code == 2 and [x for x in r.output.splitlines() if x.startswith("Error")] == \
        ["Error: Invalid value for '--moments': 'bogus' is not one of 'keep', 'reset', 'momentum'."]
    r = run("train", path, "--rewarm", "-1", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "Invalid value for '--rewarm'" in r.output
    assert not (tmp_path / "x").exists()
    choices = next(p for p in main.commands["train"].params if p.name == "moments").type.choices
    assert tuple(choices) == BC.MOMENTS
    out = tmp_path / "run"
    r = run("train", path, "--schedule", "8:1,6:1,4:1", "--steps", "6", "--lr", "1e-3", "--moments", "reset",
            "--rewarm", "2", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["moments"] == "reset" and summary["config"]["rewarm"] == 2
    assert [(c["step"], c["from"], c["to"]) for c in summary["bit_changes"]] == [(3, 8.0, 6.0), (5, 6.0, 4.0)]
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["lr"] for x in rows] == pytest.approx([1e-3, 1e-3, 5e-4, 1e-3, 5e-4, 1e-3])
    assert json.loads((out / "run.json").read_text())["train"]["moments"] == "reset"
    r = run("train", "--resume", out, "--moments", "keep")
    assert r.exit_code == 2 and "drop --moments" in r.output


def test_reset_under_fsdp_and_ddp(tmp_path):
    """The module student over 2 gloo processes: FSDP2 resets each process's local shards of the moments
    (DTensors) and computes what DDP's whole-tensor reset does; the step count restarts at the change."""
    import os
    import subprocess
    import sys

    toy = toy_file(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    losses = {}
    for strategy in ("fsdp", "ddp"):
        p = subprocess.run([sys.executable, "-m", "fbqc.cli", "train", str(toy), "-o", strategy, "--nproc", "2",
                            "--strategy", strategy, "--moments", "reset", "--rewarm", "2", "--schedule", "8:1,4:2",
                            "--steps", "6", "--lr", "1e-3", "-q", "--json"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        summary = json.loads(p.stdout)
        assert summary["strategy"] == strategy and [c["step"] for c in summary["bit_changes"]] == [3]
        assert _opt_steps(tmp_path / strategy) == {4.0}                # 6 steps, reset before the third
        rows = [json.loads(x) for x in (tmp_path / strategy / "log.jsonl").read_text().splitlines()]
        assert [x["lr"] for x in rows] == pytest.approx([1e-3, 1e-3, 5e-4, 1e-3, 1e-3, 1e-3])
        losses[strategy] = [x["loss"] for x in rows]
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)
