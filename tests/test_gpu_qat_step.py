"""Smoke test of benchmarks/gpu_qat_step.py on the CPU (tiny Sana, eager): the teacher-cache variant
(`fbqc train --teacher-cache`'s step) runs no teacher forward, starts from the live step's loss, and its
step time is stated as a ratio to the live-teacher step of the same run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from test_qat_toy import one_thread

ROOT = Path(__file__).resolve().parents[1]


def test_teacher_cache_variant_beside_the_live_teacher(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_qat_step", ROOT / "benchmarks" / "gpu_qat_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "step.json"
    with one_thread():
        assert bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                           "--variants", "fused-eager,fused-eager-tc", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    live, cached = rows["fused-eager"], rows["fused-eager-tc"]
    assert live["teacher_forwards"] == 4 and cached["teacher_forwards"] == 0     # warm-up + 2 + bit change
    assert cached["teacher_cache"] and not live["teacher_cache"]
    assert cached["first_loss"] == live["first_loss"] > 0                        # same target, same step
    assert cached["teacher_cache_ratio"] == cached["step_ms"] / live["step_ms"]
    assert "teacher cache: fused-eager-tc takes" in capsys.readouterr().out
