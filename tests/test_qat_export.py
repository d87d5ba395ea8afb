"""fbqc export-diffusers: the trained student as a diffusers checkpoint that from_pretrained loads,
with its quantized layers on the W-bit grid and the rest as trained."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from diffusers import SanaTransformer2DModel

from fbqc.cli import main
from fbqc.ops.fake_quant import weight_value
from fbqc.frontend import _entry, load_model_file
from fbqc.qat.rundir.checkpoint import load_student
from fbqc.qat.students.modules import quantize_modules
from fbqc.quant_math import narrow_levels
from fbqc.spec import QuantSpec
from test_qat_toy import one_thread, toy_file

SANA = Path(__file__).resolve().parents[1] / "examples" / "sana.py"


def test_export_diffusers_roundtrip(tmp_path):
    runner = CliRunner()
    with one_thread():
        res = runner.invoke(main, ["train", str(SANA), "-o", str(tmp_path / "run"), "--schedule", "direct",
                                   "--bits", "4.5", "--steps", "3", "--lr", "1e-3", "-q"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(main, ["export-diffusers", str(tmp_path / "run"), str(tmp_path / "ckpt"), "--json"])
        assert res.exit_code == 0, res.output
        summary = json.loads(res.output)
        assert summary["layers"] == 20 and summary["bits"] == [4.5]
        loaded = SanaTransformer2DModel.from_pretrained(str(tmp_path / "ckpt"))
        state = load_student(tmp_path / "run")
        specs = {k: QuantSpec.from_dict(v) for k, v in
                 json.loads((tmp_path / "ckpt" / "fbqc_quant.json").read_text())["specs"].items()}
        lo, hi = narrow_levels(4.5)
        for name, p in loaded.named_parameters():
            layer = name.removesuffix(".weight")
            if layer in specs:
                bits = torch.tensor(4.5, dtype=torch.float64)
                assert torch.equal(p, weight_value(state[name], bits, 0, "narrow")), name
                assert max(len(torch.unique(row)) for row in p) <= hi - lo + 1
            else:
                assert torch.equal(p, state[name]), name         # trained, not quantized
        # the same network as the trained student with float activations
        mf = load_model_file(SANA)
        student = mf.call("model")
        student.load_state_dict(state, strict=False)
        quantize_modules(student, specs, act_quant="none")
        x = mf.call("example_inputs")
        with torch.no_grad():     # same weights; convolution algorithms may associate differently
            torch.testing.assert_close(_entry(loaded.eval())(**x)[0], _entry(student)(**x)[0],
                                       rtol=1e-5, atol=1e-6)
        again = runner.invoke(main, ["export-diffusers", str(tmp_path / "run"), str(tmp_path / "ckpt")])
        assert again.exit_code == 2 and "--force" in again.output


def test_export_diffusers_errors(tmp_path):
    runner = CliRunner()
    toy = toy_file(tmp_path)
    with one_thread():
        runner.invoke(main, ["train", str(toy), "-o", str(tmp_path / "cut"), "--steps", "4", "--stop-after", "2",
                             "-q"])
        res = runner.invoke(main, ["export-diffusers", str(tmp_path / "cut"), str(tmp_path / "o1")])
        assert res.exit_code == 2 and "has not finished" in res.output
        runner.invoke(main, ["train", "--resume", str(tmp_path / "cut"), "-q"])
        res = runner.invoke(main, ["export-diffusers", str(tmp_path / "cut"), str(tmp_path / "o2")])
        assert res.exit_code == 2 and "no save_pretrained" in res.output
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2.*"))
