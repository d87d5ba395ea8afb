"""Smoke test of benchmarks/paper_table.py's code path at tiny sizes (the real table is not run in CI)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("paper_table", ROOT / "benchmarks" / "paper_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_frechet_distance_against_closed_forms():
    pt = _module()
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert pt.frechet(a, a) == pytest.approx(0.0, abs=1e-9)
    # same covariance, shifted mean: FD = |Δμ|²; isotropic scales s1, s2: FD ≈ d (s1 - s2)²
    assert pt.frechet(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, rel=1e-9)
    assert pt.frechet(a, 3 * a) == pytest.approx(3 * (1 - 3) ** 2, rel=0.05)


def test_paper_table_code_path_runs_tiny(tmp_path):
    pt = _module()
    args = pt.parse(["--seeds", "1", "--methods", "ptq,direct,fractional", "--width", "16", "--layers", "1",
                     "--batch", "8", "--teacher-steps", "4", "--qat-steps", "9", "--samples", "8",
                     "--sample-steps", "2", "--classifier-steps", "5", "--calib-batches", "2",
                     "--out", str(tmp_path)])
    lines = []
    res = pt.run(args, log=lines.append)
    assert set(res["runs"]) == {"ptq", "direct", "fractional"}
    for m, runs in res["runs"].items():
        s = runs[0]
        assert math.isfinite(s["fd"]) and s["fd"] >= 0 and math.isfinite(s["psnr"]) and 0 <= s["label_acc"] <= 1
        assert (s["final_kd_loss"] is None) == (m == "ptq")
    assert len(res["curves"]["fractional"]) == 9
    table = (tmp_path / "table.md").read_text()
    assert "| fractional |" in table and "| float teacher (vs real digits) |" in table
    assert json.loads((tmp_path / "results.json").read_text())["table"] == res["table"]
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
