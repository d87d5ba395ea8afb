"""benchmarks/gpu_qat_scaling.py on the CPU (gloo): it runs the real `fbqc train` commands, stops each
after the asked steps, and its throughput ratio is N × (1-process s/step) / (N-process s/step)."""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_scaling_benchmark_smoke(tmp_path):
    out = tmp_path / "scaling.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_qat_scaling.py"), "--preset", "tiny",
                        "--device", "cpu", "--gpus", "2", "--batch", "2", "--steps", "10", "--skip", "2",
                        "--configs", "ddp", "--no-compile", "--json", str(out),
                        "--profile-dir", str(tmp_path / "prof")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    base, ddp = rows["1 GPU"], rows["ddp"]
    assert (base["processes"], base["global_batch"]) == (1, 2) and (ddp["processes"], ddp["global_batch"]) == (2, 4)
    assert base["steps"] == ddp["steps"] == 10                  # stopped after the asked steps
    assert ddp["throughput_ratio"] == pytest.approx(2 * base["step_s"] / ddp["step_s"])
    assert ddp["median_ratio"] == pytest.approx(2 * base["median_s"] / ddp["median_s"])
    assert ddp["samples_per_s"] == pytest.approx(4 / ddp["step_s"])
    for r in (base, ddp):                                        # the mean over the timed steps' intervals
        assert len(r["deltas"]) == 10 - 2 - 1
        assert r["step_s"] == pytest.approx(statistics.mean(r["deltas"]), abs=1e-3)
        assert r["median_s"] == pytest.approx(statistics.median(r["deltas"]), abs=1e-3)
    assert "ddp" in p.stdout and "× 1 GPU" in p.stdout and "× median" in p.stdout
    tables = sorted(f.name for f in (tmp_path / "prof").iterdir())
    assert tables == ["1-GPU-rank0.txt", "ddp-rank0.txt", "ddp-rank1.txt"]
    assert "DistributedDataParallel.forward" in (tmp_path / "prof" / "ddp-rank0.txt").read_text()


def test_config_names():
    """NAME[-cg][@VAR=V+VAR=V]: the fbqc train flags, the environment of that run, CUDA graphs."""
    spec = importlib.util.spec_from_file_location("gpu_qat_scaling", ROOT / "benchmarks" / "gpu_qat_scaling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse("ddp") == (["--strategy", "ddp"], {}, False)
    assert bench.parse("ddp-bf16-cg@NCCL_MAX_CTAS=8+NCCL_PROTO=Simple") == (
        ["--strategy", "ddp", "--grad-reduce", "bf16", "--cuda-graphs"],
        {"NCCL_MAX_CTAS": "8", "NCCL_PROTO": "Simple"}, True)
    assert bench.parse("fsdp-keep-rt-u4")[0] == ["--strategy", "fsdp", "--fsdp-keep-params",
                                                 "--fsdp-replicate-teacher", "--fsdp-unit", "4"]
    assert bench.parse("ddp-bf16-b25-cg@NCCL_PROTO=Simple") == (
        ["--strategy", "ddp", "--grad-reduce", "bf16", "--ddp-bucket-mb", "25", "--cuda-graphs"],
        {"NCCL_PROTO": "Simple"}, True)
    for bad in ("dp", "ddp@NCCL_MAX_CTAS", "ddp@=1", "ddp-u", "ddp-cg-b25", "fsdp-keep-x4"):
        with pytest.raises(KeyError):
            bench.parse(bad)
