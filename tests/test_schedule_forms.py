"""Schedule forms beyond BITS:PARTS: ramps ``FROM..TO:PARTS``, the named ``continuous``, ``NAME@SHARE``;
their step semantics (bits per step, phase ends), and a short real training run through a ramp."""
from __future__ import annotations

import json
import pickle
import re
from fractions import Fraction

import pytest

import torch

import fbqc
from fbqc.passes import AnnotateLinears, InsertFakeQuant
from fbqc.qat import NAMED, Schedule, TrainConfig, bits_buffers
from fbqc.qat.rundir import checkpoint as ck
from fbqc.qat.rundir.summary import summarize, summary_text
from test_qat_schedule import TABLE4, _hamilton, phases
from test_qat_toy import one_thread, toy_file


def bits(s: Schedule) -> list[float]:
    return [s.bits_at(i) for i in range(s.steps)]


def ends(s: Schedule) -> list[int]:
    return [i for i in range(s.steps) if s.changes_after(i)]


def test_ramp_bits_per_step_by_hand():
    s = Schedule.parse("8..4:1,4:1", 4)                  # 2 ramp steps: 8 - 4·1/2, 8 - 4·2/2
    assert bits(s) == [6.0, 4.0, 4, 4] and s.bits_at(4) == 4 and s.final_bits == 4
    assert bits(Schedule.parse("8..5:1", 3)) == [7, 6, 5]                      # a ramp alone
    assert bits(Schedule.parse("16:1,8..4:4,4:1", 6)) == [16, 7, 6, 5, 4, 4]  # a ramp in the middle
    s = Schedule.parse("8:1,6..4:2", 3)                                        # a ramp last: final = TO
    assert bits(s) == [8, 5, 4] and s.final_bits == 4 and s.spec == "8:1,6..4:2"
    s = Schedule.parse("5.5..4.25:1", 5)                                       # step 1.25 / 5 = 0.25
    assert bits(s) == [5.25, 5.0, 4.75, 4.5, 4.25]
    assert s.describe() == "5.5→4.25 ramp (5) bits over 5 steps"
    assert Schedule.parse("continuous", 1000).describe() == "8→4 ramp (440) → 4 (560) bits over 1000 steps"


def test_phase_ends_not_every_ramp_step():
    s = Schedule.parse("8..4:10,4:10", 20)
    assert len(set(bits(s)[:10])) == 10                  # the bits change on every ramp step …
    assert ends(s) == [9]                                # … but the phase ends once
    assert [s.phase_index(i) for i in range(21)] == [0] * 10 + [1] * 11
    # the bits equal across the boundary (the ramp ends at 4, the next phase is 4): still a phase end
    assert Schedule.parse("8..4:2,4:2", 8).bits_at(3) == Schedule.parse("8..4:2,4:2", 8).bits_at(4) == 4
    assert ends(Schedule.parse("8..4:2,4:2", 8)) == [3]
    assert ends(Schedule.parse("continuous", 1000)) == [439]
    assert ends(Schedule.parse("fractional", 250)) == [9, 19, 29, 39, 49, 69, 89, 109]
    s = Schedule.parse("8:1,8..4:2,7..5:1,4:1", 10)      # phase starts: s > 0 with changes_after(s - 1)
    starts = [0] + [i for i in range(1, 10) if s.changes_after(i - 1)]
    assert starts == [b[0] for b in s.boundaries()] == [0, 2, 6, 8]
    assert [s.phase_index(i) for i in starts] == [0, 1, 2, 3]


def test_boundaries_are_three_tuples_with_the_ramp_start():
    s = Schedule.parse("16:1,8..4:2,4:1", 8)
    b = s.boundaries()
    assert b == [(0, 2, 16), (2, 6, 4), (6, 8, 4)]       # (start, end, bits): a ramp's bits = its TO
    assert [x.from_bits for x in b] == [16, 8, 4] and [x.ramp for x in b] == [False, True, False]
    assert [x.label for x in b] == ["16", "8→4", "4"]
    assert [b[1].bits_at(i) for i in range(2, 6)] == [7, 6, 5, 4]
    assert [x.from_bits for x in pickle.loads(pickle.dumps(b))] == [16, 8, 4]


def test_continuous_spends_fractionals_4_bit_steps():
    assert phases(Schedule.parse("continuous", 25)) == [(4, 11), (4, 14)]
    assert Schedule.parse("continuous", 25).phases[0].from_bits == 8
    above = sum(p for b, p in TABLE4 if b > 4)
    assert [p.parts for p in Schedule.parse("continuous", 25).phases] == [above, 25 - above]
    for n in (25, 50, 100, 250, 1000, 2000, 10, 1003, 7):
        c, f = Schedule.parse("continuous", n), Schedule.parse("fractional", n)
        assert c.phase_steps()[-1] == f.phase_steps()[-1], n
        assert c.phase_steps()[0] == sum(f.phase_steps()[:-1]), n
    for n in range(1, 600):                              # the two splits never differ by more than a step
        c, f = Schedule.parse("continuous", n), Schedule.parse("fractional", n)
        assert abs(c.phase_steps()[-1] - f.phase_steps()[-1]) <= 1, n


def _shared(name, share, steps):
    """Expected split of NAME@SHARE, from the table with exact rationals."""
    table = [float(x.split(":")[1]) for x in NAMED[name].split(",")]
    early = [Fraction(p) for p in table[:-1]]
    parts = [p * (1 - share) / sum(early) for p in early] + [share]
    return _hamilton(parts, steps)


@pytest.mark.parametrize("text,share", [("fractional@0.3", Fraction(3, 10)), ("integer@0.8", Fraction(4, 5)),
                                        ("continuous@0.5", Fraction(1, 2)), ("simple@0.25", Fraction(1, 4))])
def test_share_sets_the_final_phase_fraction(text, share):
    name = text.split("@")[0]
    for n in (10, 25, 100, 1000, 4321):
        s = Schedule.parse(text, n)
        assert s.name == text and s.phase_steps() == _shared(name, share, n), n
        assert abs(s.phase_steps()[-1] - n * share) < 1
        assert [p.bits for p in s.phases] == [p.bits for p in Schedule.parse(name, n).phases]


def test_share_specifics():
    assert Schedule.parse("continuous@0.5", 100).phase_steps() == [50, 50]
    assert Schedule.parse("integer@0.8", 100).phase_steps() == [5, 5, 5, 5, 80]
    for n in (25, 1000, 250, 17, 3):                     # the paper's own share changes nothing
        assert Schedule.parse("fractional@0.56", n).phase_steps() == Schedule.parse("fractional", n).phase_steps()
        assert Schedule.parse("continuous@0.56", n).phase_steps() == Schedule.parse("continuous", n).phase_steps()
    assert Schedule.parse(" fractional@.30 ", 10).name == "fractional@0.3"     # normalized: resume compares it
    # the target applies after the share, with the usual merge
    a, b = Schedule.parse("fractional@0.56", 100, 4.5), Schedule.parse("fractional", 100, 4.5)
    assert a.phase_steps() == b.phase_steps() and [p.bits for p in a.phases] == [p.bits for p in b.phases]
    assert phases(Schedule.parse("integer@0.8", 100, 6)) == [(8, 0.05), (7, 0.05), (6, 0.9)]


def test_target_bits_with_continuous():
    s = Schedule.parse("continuous", 100, 3)
    assert s.spec == "8..3:11,3:14" and s.name == "continuous" and s.final_bits == 3
    assert s.bits_at(0) == 8 + (3 - 8) / 44 and s.bits_at(43) == 3 and s.bits_at(99) == 3
    assert Schedule.parse("continuous", 100, 6).spec == "8..6:11,6:14"
    assert Schedule.parse("continuous", 100, 4).spec == NAMED["continuous"]
    assert Schedule.parse("continuous", 100, 8).spec == "8:25"             # FROM at the target: merged
    assert Schedule.parse("continuous", 100, 16).spec == "16:25"
    assert Schedule.parse("continuous@0.3", 100, 3).spec == "8..3:0.7,3:0.3"
    assert Schedule.parse("8..3:1,3:1", 10, 3).final_bits == 3               # custom: ends at the target
    with pytest.raises(ValueError, match="ends at 4 bits but --bits is 3"):
        Schedule.parse("8:1,6..4:1", 10, target_bits=3)


@pytest.mark.parametrize("text,target", [("8..4:11,4:14", None), ("continuous", None), ("continuous", 3),
                                         ("fractional@0.3", None), ("integer@0.8", 5), ("continuous@0.37", 4.5),
                                         ("16:1,8..4.25:2.5,4.25..2:1", None), ("8:1,6..4:2", 4),
                                         ("fractional", None), ("simple@0.9", 2)])
def test_round_trip(text, target):
    s = Schedule.parse(text, 997, target)
    d = json.loads(json.dumps(s.to_dict()))               # as run.json and the checkpoint keep it
    assert Schedule.from_dict(d) == s and Schedule.from_dict(d).phase_steps() == s.phase_steps()
    assert Schedule.parse(s.spec, 997).phases == s.phases


@pytest.mark.parametrize("bad,msg", [
    ("4..8:2", "schedule item '4..8:2' rises from 4 to 8 bits; a ramp must fall (FROM > TO, e.g. 8..4:2)"),
    ("8:1,5..5:2", "schedule item '5..5:2' is a ramp from 5 to 5 bits; for constant bits use TO:PARTS (5:2)"),
    ("17..4:1", "[2, 16]"), ("8..1:1", "[2, 16]"), ("..4:1", "[2, 16]"), ("8..4:0", "> 0"), ("8..4", "FROM..TO:PARTS"),
    ("fractional@0", "SHARE must be a number in (0, 1)"), ("fractional@1", "SHARE must be a number in (0, 1)"),
    ("integer@1.5", "SHARE must be a number in (0, 1)"), ("continuous@x", "e.g. continuous@0.5; got 'x'"),
    ("fractional@nan", "(0, 1)"), ("fractional@", "(0, 1)"), ("fractional@1/2", "(0, 1)"),
    ("direct@0.5", "direct is one phase at the target, it has no share to set; use direct, or @SHARE on"),
    ("8:1,4:1@0.5", "@SHARE follows a named schedule"), ("frac@0.5", "@SHARE follows a named schedule")])
def test_errors(bad, msg):
    with pytest.raises(ValueError, match=re.escape(msg)) as e:
        Schedule.parse(bad, 10)
    assert "\n" not in str(e.value)


def test_summary_labels_a_ramp():
    s = Schedule.parse("8..4:2,4:2", 8)
    rows = [{"step": i + 1, "loss": 1.0 / (i + 1)} for i in range(8)]
    summary = summarize(rows, s, TrainConfig(), ["a"], 1.0, True, "note")
    assert [(p["label"], p["bits"], p.get("from_bits"), p["steps"]) for p in summary["phases"]] == \
        [("8→4 ramp", 4, 8, 4), ("4", 4, None, 4)]
    assert summary["phases"][0]["loss_start"] == 1.0 and summary["phases"][1]["loss_end"] == 1 / 8
    text = summary_text(summary, None)
    assert "8→4 ramp" in text and "(8..4:2,4:2)" in text


def test_training_through_a_ramp(tmp_path, monkeypatch):
    """The real trainer on the toy program: the bits per step follow the ramp, checkpoints only at the
    phase end and the run's end, and a run interrupted inside the ramp resumes bit-exactly."""
    teacher, mf = fbqc.export_model_file(toy_file(tmp_path))
    saves, seen = [], []
    real_save = ck.save_checkpoint
    monkeypatch.setattr(ck, "save_checkpoint", lambda out, **kw: (saves.append((out.name, kw["done"])),
                                                                  real_save(out, **kw)))

    def run(out, student, **kw):
        return fbqc.qat.train(student, teacher, lambda: mf.call("training_data"), schedule="8..4:2,4:2", steps=8,
                              lr=3e-3, checkpoint_every=0, out=tmp_path / out, progress=False, log=lambda s: None,
                              **kw)

    def task(sample, pred):                      # sees the bits buffers the fake-quant ops read this step
        seen.append({float(v) for v in bits_buffers(s).values()})
        return pred[0].sum() * 0.0

    sched = Schedule.parse("8..4:2,4:2", 8)
    with one_thread():
        s = fbqc.PassManager([AnnotateLinears(4.0), InsertFakeQuant()])(teacher)
        straight = run("a", s, task_loss=task)
        assert saves == [("a", 4), ("a", 8)]
        assert [r["bits"] for r in straight.log] == [sched.bits_at(i) for i in range(8)] == [7, 6, 5, 4, 4, 4, 4, 4]
        assert seen == [{b} for b in (7, 6, 5, 4, 4, 4, 4, 4)]
        assert all(float(v) == 4.0 for v in bits_buffers(s).values())
        summary = json.loads((tmp_path / "a" / "summary.json").read_text())
        assert [(p["label"], p["steps"]) for p in summary["phases"]] == [("8→4 ramp", 4), ("4", 4)]
        assert json.loads((tmp_path / "a" / "run.json").read_text())["schedule"]["spec"] == "8..4:2,4:2"
        assert (tmp_path / "a" / "loss.png").read_bytes()[:4] == b"\x89PNG"
        saves.clear()
        run("b", fbqc.PassManager([AnnotateLinears(4.0), InsertFakeQuant()])(teacher), stop_after=2)
        resumed = run("b", fbqc.PassManager([AnnotateLinears(4.0), InsertFakeQuant()])(teacher), resume=True)
        assert saves == [("b", 2), ("b", 4), ("b", 8)]
        strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in x.log] for x in (straight, resumed)]
        assert strip[0] == strip[1]
        a = dict(straight.program.graph_module.named_parameters())
        b = dict(resumed.program.graph_module.named_parameters())
        assert all(torch.equal(a[k], b[k]) for k in a)
