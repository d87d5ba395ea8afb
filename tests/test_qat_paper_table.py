"""benchmarks/paper_table.py: its reduced CPU run over the four architectures (the real table is not run
in CI), the paired analysis and verdict against hand-computed numbers, resume, and the method syntax."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[1]


def _module(name: str = "paper_table"):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod                  # the worker processes pickle its functions by this name
    spec.loader.exec_module(mod)
    return mod


TINY = ["--width", "16", "--layers", "2", "--batch", "8", "--teacher-steps", "6", "--qat-steps", "12",
        "--samples", "16", "--sample-steps", "2", "--classifier-steps", "20", "--calib-batches", "1"]


def test_reduced_table_four_archs_in_worker_processes(tmp_path):
    pt = _module()
    methods = "ptq,direct,fractional,continuous,fractional+moments=reset+rewarm=2"
    a = pt.parse(["--reduced", *TINY, "--seeds", "2", "--methods", methods, "--jobs", "2", "--out", str(tmp_path)])
    res = pt.run(a, log=lambda s: None)
    assert set(res["archs"]) == {"sana", "pixart", "sd3", "flux"}
    for k, arch in res["archs"].items():
        assert (tmp_path / "teachers" / f"{k}.pt").is_file()
        for m, runs in arch["runs"].items():
            assert len(runs) == 2
            for r in runs:
                assert math.isfinite(r["fid"]) and r["fid"] >= 0 and math.isfinite(r["psnr"]) and 0 <= r["ssim"] <= 1
                assert (r["final_kd_loss"] is None) == (m == "ptq")
            st = arch["stats"][m]
            assert st["fid_mean"] == pytest.approx(np.mean([r["fid"] for r in runs]))
            if m != "fractional":            # paired per seed, against the reference's same seed
                ref = arch["runs"]["fractional"]
                assert st["deltas"] == pytest.approx([r["fid"] - f["fid"] for r, f in zip(runs, ref)])
        assert len(arch["curves"]["fractional"]) == 12
        # the fractional schedule changes bits 8 times at 12 steps (phases of ≥ 1 step); the report has them
        changes = arch["runs"]["fractional"][0]["bit_changes"]
        assert [c["to"] for c in changes] == sorted({b for b in arch["bits"]["fractional"]} - {8.0}, reverse=True)
        assert arch["bits"]["continuous"][:4] == pytest.approx([8 - 4 * (i + 1) / 5 for i in range(4)])
    table = (tmp_path / "table.md").read_text()
    assert table.count("| fractional+moments=reset+rewarm=2 ") + table.count("fractional+moments=reset+rewarm=2*") >= 4
    assert "**Verdict**" in table
    assert json.loads((tmp_path / "results.json").read_text())["table"] == res["table"]
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_keeps_the_students_and_refuses_other_settings(tmp_path):
    pt = _module()
    a = pt.parse([*TINY, "--seeds", "1", "--arch", "sana", "--methods", "ptq", "--out", str(tmp_path)])
    first = pt.run(a, log=lambda s: None)["archs"]["sana"]["runs"]["ptq"][0]
    lines = []
    b = pt.parse([*TINY, "--seeds", "1", "--arch", "sana", "--methods", "ptq,direct", "--resume",
                  "--out", str(tmp_path)])
    res = pt.run(b, log=lines.append)
    assert res["archs"]["sana"]["runs"]["ptq"][0] == first          # kept, not recomputed
    assert any("1 student(s) kept" in x for x in lines) and any("teacher loaded" in x for x in lines)
    assert math.isfinite(res["archs"]["sana"]["runs"]["direct"][0]["fid"])
    c = pt.parse([*TINY, "--qat-steps", "13", "--seeds", "1", "--arch", "sana", "--methods", "ptq", "--resume",
                  "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--qat-steps 12 → 13"):
        pt.run(c, log=lambda s: None)


def _results(fids: dict[str, dict[str, list[float]]]) -> dict:
    methods = list(next(iter(fids.values())))
    return {"config": {"methods": methods},
            "archs": {k: {"runs": {m: [{"fid": f} for f in v] for m, v in per.items()}} for k, per in fids.items()}}


def test_verdict_needs_three_of_four_archs_beyond_the_seed_spread():
    R = _module("paper_report")
    base = {"fractional": [10.0, 11.0, 12.0]}                       # std 0.8165
    clear = {"direct": [8.0, 9.0, 10.0]}                            # Δ −2 each: wins (2 > 0.8165)
    close = {"direct": [9.5, 10.5, 11.5]}                           # Δ −0.5: inside the spread
    res = _results({"sana": {**base, **clear}, "pixart": {**base, **clear}, "sd3": {**base, **close},
                    "flux": {**base, **clear}})
    R.analyse(res, "fractional")
    st = res["archs"]["sana"]["stats"]["direct"]
    assert st["deltas"] == [-2.0, -2.0, -2.0] and st["spread"] == pytest.approx(np.std([10, 11, 12]))
    assert st["wins"] and not res["archs"]["sd3"]["stats"]["direct"]["wins"]
    assert res["verdict"]["wins"]["direct"] == ["sana", "pixart", "flux"]
    assert res["verdict"]["default"] == "direct" and res["verdict"]["needed"] == 3
    res = _results({"sana": {**base, **clear}, "pixart": {**base, **clear}, "sd3": {**base, **close},
                    "flux": {**base, **close}})
    R.analyse(res, "fractional")
    assert res["verdict"]["default"] == "fractional" and "stays fractional" in res["verdict"]["text"]


def test_method_syntax():
    pt = _module()
    a = pt.parse(["--qat-steps", "400"])
    assert pt.method_config("ptq", a) == (None, {})
    assert pt.method_config("fractional+moments=reset+rewarm=8+lr=1e-4", a) == (
        "fractional", {"lr": 1e-4, "warmup": 20, "moments": "reset", "rewarm": 8})
    for bad, msg in (("fractional+foo=1", "KEY=VALUE"), ("direct+rewarm=x", "not a int"), ("direct+lr", "KEY=VALUE")):
        with pytest.raises(ValueError, match=msg):
            pt.method_config(bad, a)


def test_out_must_be_new_empty_or_a_paper_table(tmp_path):
    pt = _module()
    (tmp_path / "notes.txt").write_text("the user's")
    a = pt.parse([*TINY, "--seeds", "1", "--arch", "sana", "--methods", "ptq", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="holds no paper table"):
        pt.run(a, log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]     # nothing written


def test_non_finite_samples_are_an_error_not_a_score():
    pt = _module()
    x = torch.zeros(4, 1, 8, 8)
    x[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="1 samples values are not finite"):
        pt.score(x, torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
