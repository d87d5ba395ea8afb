"""Data-parallel QAT (fbqc.qat.parallel.dist, fbqc.qat.students.modules): the module student computes what the program
student computes; `fbqc train --nproc 2` (two gloo processes through torchrun) follows the loss
trajectory of one process; FSDP2 checkpoints resume on another number of processes; bad set-ups fail
with a clear message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import fbqc
from fbqc.cli import main
from fbqc.frontend import _entry
from fbqc.passes import AnnotateLinears, InsertFakeQuant
from fbqc.qat import training_view
from fbqc.qat.students.modules import FakeQuantLinear, annotate_modules, block_modules, module_bits, quantize_modules
from test_qat_toy import one_thread, toy_file

SANA = Path(__file__).resolve().parents[1] / "examples" / "sana.py"
COMMON = ["--schedule", "8:1,4:2", "--steps", "6", "--lr", "1e-3", "-q", "--json"]


def fbqc_train(*args: str, cwd: Path) -> dict:
    """`fbqc train …` as a user runs it (a real process: --nproc re-launches through torchrun)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "fbqc.cli", "train", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_module_student_equals_program_student():
    """Same specs (one AnnotateLinears rule), same fake quant: identical outputs on Sana tiny."""
    with one_thread():
        teacher, mf = fbqc.export_model_file(SANA)
        annotate = AnnotateLinears(bits=4.5)
        student = fbqc.PassManager([annotate, InsertFakeQuant()])(teacher)
        view = training_view(student, "dynamic")
        model = mf.call("model")
        specs = annotate_modules(model, annotate)
        assert specs == student.specs()
        bits = quantize_modules(model, specs)
        assert list(bits) == list(specs) and all(float(b) == 4.5 for b in bits.values())
        assert sum(isinstance(m, FakeQuantLinear) for m in model.modules()) > 0
        assert set(model.state_dict()) == set(mf.call("model").state_dict())    # names unchanged
        assert [n for n, _ in block_modules(model)] == ["transformer_blocks.0", "transformer_blocks.1"]
        x = mf.call("example_inputs")
        with torch.no_grad():
            ours = _entry(model)(**x)[0]
            ref = view.graph_module(**x)[0]
            float_out = teacher.graph_module(**x)[0]
        assert torch.equal(ours, ref)
        assert not torch.equal(ours, float_out)
        for b in module_bits(model).values():
            b.fill_(8.0)
        with torch.no_grad():
            assert not torch.equal(_entry(model)(**x)[0], ours)         # the buffers drive the layers


def test_two_processes_follow_one_process(tmp_path):
    """DDP over 2 gloo processes (batch 4 split 2 + 2) vs one process on the whole batch: the same
    loss trajectory up to float reduction order; a different batch gives a different one."""
    toy = toy_file(tmp_path)
    one = fbqc_train(str(toy), "-o", "one", "--strategy", "ddp", *COMMON, cwd=tmp_path)
    two = fbqc_train(str(toy), "-o", "two", "--nproc", "2", "--ddp-bucket-mb", "0.002", *COMMON,
                     cwd=tmp_path)                          # 2 kB buckets: several all-reduces (from step 2)
    assert one["student"] == two["student"] == "module" and two["processes"] == 2
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    # same weights and batch; matmuls over 2 rows instead of 4 may round differently, and the fake
    # quant turns a last-bit difference near a rounding boundary into one level: agreement to ~1e-5
    assert a[0] == pytest.approx(b[0], rel=1e-4)
    assert b == pytest.approx(a, rel=1e-2)
    assert max(a) > 2 * min(a)                                          # the trajectory moves
    settings = json.loads((tmp_path / "two" / "run.json").read_text())["train"]
    assert settings["strategy"] == "ddp" and settings["ddp_bucket_mb"] == 0.002
    prog = fbqc_train(str(toy), "-o", "prog", *COMMON, cwd=tmp_path)  # the program student, 1 process
    assert prog["student"] == "program"
    assert losses(tmp_path / "prog") == pytest.approx(a, rel=1e-2)      # same math, other machinery


def test_fsdp_resumes_on_another_process_count_and_compiles(tmp_path):
    """FSDP2 keeping the gathered parameters until backward (and profiled) vs re-gathering them, cut
    at step 3 and resumed on one process: the same trajectory; the resumed run compiles."""
    toy = toy_file(tmp_path)
    fbqc_train(str(toy), "-o", "whole", "--nproc", "2", "--strategy", "fsdp", "--fsdp-keep-params",
               "--profile", *COMMON, cwd=tmp_path)
    for rank in (0, 1):                                  # --profile: a table and a trace per process
        table = (tmp_path / "whole" / "profile" / f"rank{rank}.txt").read_text()
        assert f"rank {rank}" in table and "aten::" in table and "Self CPU" in table
        trace = json.loads((tmp_path / "whole" / "profile" / f"rank{rank}.trace.json").read_text())
        assert any(e.get("name", "").startswith("ProfilerStep") for e in trace["traceEvents"])
    fbqc_train(str(toy), "-o", "rt", "--nproc", "2", "--strategy", "fsdp", "--fsdp-keep-params",   # same math:
               "--fsdp-replicate-teacher", "--fsdp-unit", "2", *COMMON, cwd=tmp_path)   # whole teacher, 2-block units
    assert losses(tmp_path / "rt") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    ddp = fbqc_train(str(toy), "-o", "ddp", "--nproc", "2", "--strategy", "ddp", *COMMON, cwd=tmp_path)
    assert ddp["strategy"] == "ddp"     # FSDP2 (optimizer and clipping on the local shards) computes what DDP does
    assert losses(tmp_path / "whole") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "fbqc.cli", "train", str(toy), "-o", "cut", "--nproc", "2",
                        "--strategy", "fsdp", "--stop-after", "3", *COMMON], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(losses(tmp_path / "cut")) == 3 and not (tmp_path / "cut" / "student.pt").exists()
    resumed = fbqc_train("--resume", "cut", "--nproc", "1", "-q", "--json", cwd=tmp_path)  # 2 → 1 process
    assert resumed["processes"] == 1 and resumed["strategy"] == "fsdp"
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), rel=1e-2)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ckpt["student_kind"] == "module" and ckpt["step"] == 6
    assert all(not k.startswith(("module.", "_orig_mod")) for k in ckpt["student"])    # plain FQNs
    res = CliRunner().invoke(main, ["compile", str(tmp_path / "cut"), "-o", str(tmp_path / "art"), "-q",
                                    "--calib-samples", "4"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["run"]["student_sha256"]


def test_errors_name_the_problem(tmp_path):
    toy = toy_file(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    run = CliRunner().invoke(main, ["train", str(toy), "-o", str(tmp_path / "full"), "--nproc", "2", "-q"])
    assert run.exit_code == 2 and "--force" in run.output        # checked before any process starts
    run = CliRunner().invoke(main, ["train", str(toy), "-o", str(tmp_path / "g"), "--nproc", "2",
                                    "--grad-reduce", "bf16", "-q"])
    assert run.exit_code == 2 and "--grad-reduce bf16 needs --device cuda" in run.output
    run = CliRunner().invoke(main, ["train", str(toy), "-o", str(tmp_path / "k"), "--strategy", "ddp",
                                    "--fsdp-keep-params", "-q"])
    assert run.exit_code == 2 and "--fsdp-keep-params needs --strategy fsdp" in run.output
    run = CliRunner().invoke(main, ["train", str(toy), "-o", str(tmp_path / "k"), "--strategy", "ddp",
                                    "--fsdp-replicate-teacher", "-q"])
    assert run.exit_code == 2 and "--fsdp-replicate-teacher needs --strategy fsdp" in run.output
    run = CliRunner().invoke(main, ["train", str(toy), "-o", str(tmp_path / "k"), "--fsdp-unit", "2", "-q"])
    assert run.exit_code == 2 and "--fsdp-unit needs --strategy fsdp" in run.output
    run = CliRunner().invoke(main, ["train", str(toy), "-o", str(tmp_path / "k"), "--strategy", "fsdp",
                                    "--ddp-bucket-mb", "25", "-q"])
    assert run.exit_code == 2 and "--ddp-bucket-mb sizes DistributedDataParallel's" in run.output
    from fbqc.qat.parallel.dist import DDP_BUCKET_MB
    assert next(p.default for p in main.commands["train"].params if p.name == "ddp_bucket_mb") == DDP_BUCKET_MB
    for flags, message in ((["--strategy", "ddp"], "needs --compile and --device cuda"),
                           (["--compile", "--device", "cuda", "--strategy", "fsdp"], "with --strategy fsdp needs --fsdp-keep-params"),
                           (["--compile", "--device", "cuda"], "add --strategy ddp")):
        run = CliRunner().invoke(main, ["train", str(toy), "-o", str(tmp_path / "c"), "--cuda-graphs", *flags, "-q"])
        assert run.exit_code == 2 and message in run.output, (flags, run.output)
        assert not (tmp_path / "c").exists()                    # refused before anything is written
    run = CliRunner().invoke(main, ["train", str(toy), "-o", str(tmp_path / "a"), "--batch", "2", "-q"])
    assert run.exit_code == 2 and "--batch > 1 needs the module student" in run.output
    with pytest.raises(Exception, match="does not split over 3 processes"):
        from fbqc.qat.parallel.dist import World, shard_batch
        shard_batch({"x": torch.zeros(4, 2)}, World(rank=0, size=3))
    CliRunner().invoke(main, ["train", str(toy), "-o", str(tmp_path / "p"), *COMMON[:-2], "--stop-after", "2",
                              "-q"])
    res = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "p"), "--strategy", "ddp", "-q"])
    assert res.exit_code == 2 and "program student" in res.output and "resume it the same way" in res.output
    with pytest.raises(ValueError, match="pointwise"):
        quantize_modules(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3)),
                         {"0": next(iter(annotate_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)),
                                                          AnnotateLinears(4, include=[".*"])).values()))})


def test_ddp_over_one_process_is_no_wrapper():
    """One process: DDP would only copy the gradients into its buckets; the plain module trains."""
    from fbqc.qat.parallel.dist import World, wrap

    m = torch.nn.Linear(2, 2)
    assert wrap(m, [], "ddp", torch.device("cpu"), World()) is m
    with pytest.raises(ValueError, match="--grad-reduce"):
        wrap(m, [], "ddp", torch.device("cpu"), World(), grad_reduce="fp16")


MAP_DATA = '''

class Logged:
    """Map-style training data (len + getitem) that records which process made which sample."""
    def __init__(self, path):
        self.path = path
    def __len__(self):
        return 5                                           # cycles: 6 steps × 2 samples > 5
    def __getitem__(self, i):
        import os
        with open(self.path, "a") as f:
            f.write(f"{os.environ.get('RANK', '-')} {i}\\n")
        g = torch.Generator().manual_seed(100 + i)
        return {"x": torch.randn(4, 8, generator=g), "scale": torch.rand(4, 1, generator=g) + 0.5}

def training_data():
    import os
    return Logged(os.environ["FBQC_TEST_DATA_LOG"])
'''


def test_map_style_data_each_process_makes_its_own_share(tmp_path):
    """training_data() with len/getitem: with --batch 2 over 2 processes each process makes only its
    sample of every batch (rank 0: 0, 2, 4, 1, …; rank 1: 1, 3, 0, …, cycling over 5), and the loss
    trajectory is the one process's on both samples."""
    from test_qat_toy import TOY

    toy = tmp_path / "toy_map.py"
    toy.write_text(TOY + MAP_DATA)
    logs = {}
    for name, extra in (("one", ["--strategy", "ddp"]), ("two", ["--nproc", "2"])):
        logs[name] = tmp_path / f"{name}.log"
        os.environ["FBQC_TEST_DATA_LOG"] = str(logs[name])
        try:
            fbqc_train(str(toy), "-o", name, "--batch", "2", *extra, *COMMON, cwd=tmp_path)
        finally:
            del os.environ["FBQC_TEST_DATA_LOG"]
    made = [line.split() for line in logs["two"].read_text().splitlines()]
    by_rank = {r: [int(i) for rr, i in made if rr == r] for r in ("0", "1")}
    want = [(2 * s + k) % 5 for s in range(6) for k in (0, 1)]            # the one process's order
    assert by_rank["0"][:6] == want[0::2] and by_rank["1"][:6] == want[1::2]
    assert [int(i) for _, i in (line.split() for line in logs["one"].read_text().splitlines())][:12] == want
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a[0] == pytest.approx(b[0], rel=1e-4) and b == pytest.approx(a, rel=1e-2)
