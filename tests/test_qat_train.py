"""fbqc.qat.train: KD against a frozen teacher, the schedule in the bits buffers, bit-exact resume,
log/plot/summary, the data-free default."""
from __future__ import annotations

import json

import pytest
import torch

import fbqc
import fbqc.qat
from fbqc.data import DATA_FREE_NOTE
from fbqc.passes import AnnotateLinears, InsertFakeQuant
from fbqc.qat import Schedule, bits_buffers
from fbqc.qat.rundir.checkpoint import RunError
from test_qat_toy import QUIET, toy_file

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    teacher, mf = fbqc.export_model_file(toy_file(d))
    nodata, _ = fbqc.export_model_file(toy_file(d, with_data=False))
    return teacher, mf, nodata


def student(teacher, bits=4.0, **kw):
    return fbqc.PassManager([AnnotateLinears(bits, **kw), InsertFakeQuant()])(teacher)


def data_of(mf):
    return lambda: mf.call("training_data")


def held_out_mse(program, teacher, n=8):
    """KD MSE on fresh samples, computed here from the two graphs (dynamic 8-bit activations)."""
    view = fbqc.qat.training_view(program, "dynamic")
    g = torch.Generator().manual_seed(99)
    total = 0.0
    with torch.no_grad():
        for _ in range(n):
            x = {"x": torch.randn(4, 8, generator=g), "scale": torch.rand(4, 1, generator=g) + 0.5}
            total += float(((view.graph_module(**x)[0] - teacher.graph_module(**x)[0]) ** 2).mean())
    return total / n


def test_kd_training_lowers_the_loss_and_leaves_the_teacher_alone(toy, tmp_path):
    teacher, mf, _ = toy
    before = {k: v.clone() for k, v in teacher.graph_module.state_dict().items()}
    untrained = held_out_mse(student(teacher), teacher)
    s = student(teacher)
    r = fbqc.qat.train(s, teacher, data_of(mf), schedule="fractional", steps=100, lr=3e-3, **QUIET)
    assert all(torch.equal(before[k], v) for k, v in teacher.graph_module.state_dict().items())
    assert all(float(b) == 4.0 for b in bits_buffers(s).values())
    trained = held_out_mse(s, teacher)
    assert trained < 0.6 * untrained, (trained, untrained)
    assert r.summary["finished"] and r.summary["phases"][-1]["bits"] == 4
    assert [row["step"] for row in r.log] == list(range(1, 101))


def test_schedule_drives_the_buffers_and_overrides_keep_their_bits(toy):
    teacher, mf, _ = toy
    s = student(teacher, include=(r"blocks\.",), layer_bits={"proj_out": 8})
    seen = []

    def record(sample, pred):                 # the task-loss hook sees the buffers the ops read
        seen.append({k: float(v) for k, v in bits_buffers(s).items()})
        return pred[0].sum() * 0.0

    w0 = {k: v.clone() for k, v in s.graph_module.named_parameters()}
    sched = Schedule.parse("8:1,5.5:1,4.25:1,4:1", 8)
    fbqc.qat.train(s, teacher, data_of(mf), schedule=sched.spec, steps=8, lr=1e-2, task_loss=record, **QUIET)
    assert len(seen) == 8
    for step, bits in enumerate(seen):
        assert bits.pop("proj_out") == 8.0
        assert set(bits.values()) == {sched.bits_at(step)}, (step, bits)
    w1 = dict(s.graph_module.named_parameters())
    # blocks_only: the transformer blocks train, the embedding and the final projection do not
    assert not torch.equal(w0["blocks.0.0.weight"], w1["blocks.0.0.weight"])
    assert torch.equal(w0["embed.weight"], w1["embed.weight"])
    assert torch.equal(w0["proj_out.weight"], w1["proj_out.weight"])


def bitwise(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _run(teacher, mf, out, **kw):
    return fbqc.qat.train(student(teacher), teacher, data_of(mf), schedule="8:1,5.5:1,4:2", steps=12,
                          lr=3e-3, warmup=3, checkpoint_every=6, out=out, **QUIET, **kw)


def test_resume_is_bit_exact_and_checked(toy, tmp_path):
    teacher, mf, _ = toy
    straight = _run(teacher, mf, tmp_path / "a")
    first = _run(teacher, mf, tmp_path / "b", stop_after=5)           # "interrupted" after 5 steps
    assert not first.summary["finished"] and not (tmp_path / "b" / "student.pt").exists()
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 5 and ck["data_position"] == 5 and set(ck["rng"]) >= {"torch", "python", "numpy"}
    resumed = _run(teacher, mf, tmp_path / "b", resume=True)
    a, b = dict(straight.program.graph_module.named_parameters()), dict(resumed.program.graph_module.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)          # the weights
    sa = torch.load(tmp_path / "a" / "student.pt")
    sb = torch.load(tmp_path / "b" / "student.pt")
    assert sa.keys() == sb.keys() and all(bitwise(sa[k], sb[k]) for k in sa)   # every tensor, NaN scales too
    assert not torch.equal(a["blocks.0.0.weight"], teacher.graph_module.get_parameter("blocks.0.0.weight"))
    oa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["optimizer"]["state"]
    ob = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.log]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in log_b] == strip
    # a different budget or schedule on resume is an error; so is a second run into the same directory
    with pytest.raises(RunError, match="--steps 12; resuming with --steps 10"):
        fbqc.qat.train(student(teacher), teacher, data_of(mf), schedule="8:1,5.5:1,4:2", steps=10,
                       out=tmp_path / "b", resume=True, **QUIET)
    with pytest.raises(RunError, match="resuming with fractional"):
        fbqc.qat.train(student(teacher), teacher, data_of(mf), schedule="fractional", steps=12,
                       out=tmp_path / "b", resume=True, **QUIET)
    with pytest.raises(RunError, match="already holds a run"):
        _run(teacher, mf, tmp_path / "a")


def test_log_plot_and_summary_are_written(toy, tmp_path):
    teacher, mf, _ = toy
    r = _run(teacher, mf, tmp_path / "r")
    png = (tmp_path / "r" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rows = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    sched = Schedule.parse("8:1,5.5:1,4:2", 12)
    assert [(x["step"], x["bits"]) for x in rows] == [(i + 1, sched.bits_at(i)) for i in range(12)]
    assert rows[0]["lr"] == pytest.approx(3e-3 / 3) and rows[5]["lr"] == 3e-3     # warm-up, then constant
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [(p["bits"], p["steps"]) for p in summary["phases"]] == [(8, 3), (5.5, 3), (4, 6)]
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["schedule"]["spec"] == "8:1,5.5:1,4:2" and run["train"]["lr"] == 3e-3
    assert r.summary == summary


def test_data_free_default_and_static_activations(toy, tmp_path):
    _, _, teacher = toy                                       # a model file without training_data()
    lines, xs = [], []

    def record(sample, pred):
        xs.append({k: v.clone() for k, v in sample.items()})
        return pred[0].sum() * 0.0

    fbqc.qat.train(student(teacher), teacher, None, schedule="direct", steps=3, task_loss=record,
                   progress=False, log=lines.append)
    assert DATA_FREE_NOTE in lines[0]
    ex = teacher.example_inputs
    assert all(x["x"].shape == ex["x"].shape for x in xs) and not torch.equal(xs[0]["x"], xs[1]["x"])
    assert abs(float(torch.stack([x["x"] for x in xs]).mean()) - float(ex["x"].mean())) < 0.5
    # static activation scales: calibrated before training, finite, used by the training view
    s = student(teacher)
    fbqc.qat.train(s, teacher, None, schedule="direct", steps=2, act_quant="static", calib_samples=4, **QUIET)
    scales = [s.attr(n.args[1]) for n in s.graph.nodes if n.target == torch.ops.fbqc.fake_quant_act.default]
    assert scales and all(bool(torch.isfinite(t)) and float(t) > 0 for t in scales)


def test_run_and_artifact_files_read_with_named_errors(tmp_path):
    """run.json and manifest.json share one reader: a missing, broken or foreign-format file is an
    error naming the file and the problem (RunError / ArtifactError, both user errors)."""
    from fbqc.artifact import read_manifest
    from fbqc.errors import ArtifactError
    from fbqc.qat.rundir.checkpoint import RunError, read_run

    with pytest.raises(RunError, match="does not exist"):
        read_run(tmp_path / "nope")
    with pytest.raises(RunError, match="not an fbqc training run"):
        read_run(tmp_path)
    with pytest.raises(ArtifactError, match="not an fbqc artifact"):
        read_manifest(tmp_path)
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(RunError, match=r"run\.json: not valid JSON"):
        read_run(tmp_path)
    for body, found in (('{"format": 999}', "999"), ("[1, 2]", "None")):
        (tmp_path / "run.json").write_text(body)
        (tmp_path / "manifest.json").write_text(body)
        with pytest.raises(RunError, match=rf"run\.json: run format {found}, this fbqc reads"):
            read_run(tmp_path)
        with pytest.raises(ArtifactError, match=rf"manifest\.json: artifact format {found}, this fbqc reads"):
            read_manifest(tmp_path)


def test_on_device_leaves_the_program_and_its_teacher_where_they_are(toy):
    """A PTQ student shares its weights with the teacher (a pass's output shares its input's tensors);
    a runnable copy on another device must not move them (it did: the cached teacher then ran on the GPU)."""
    from fbqc.qat.students.program import on_device

    teacher = toy[0]
    s = student(teacher)
    shared = dict(teacher.graph_module.named_parameters())
    assert all(p is shared[k] for k, p in s.graph_module.named_parameters() if k in shared)   # what makes it matter
    moved = on_device(s, "meta")
    assert {p.device.type for p in moved.parameters()} == {"meta"}
    assert {p.device.type for p in s.graph_module.parameters()} == {"cpu"}
    assert {p.device.type for p in teacher.graph_module.parameters()} == {"cpu"}
    same = on_device(s, "cpu")                         # and on the same device: own tensors, same outputs
    assert not any(p.data_ptr() == shared[k].data_ptr() for k, p in same.named_parameters() if k in shared)
    x = teacher.example_inputs
    torch.testing.assert_close(on_device(teacher, "cpu")(**x), teacher.graph_module(**x), rtol=0, atol=0)
