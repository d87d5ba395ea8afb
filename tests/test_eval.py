"""``fbqc eval``: the capture's prompts through the pipeline with a student transformer (issue 15 part 4).

One tiny Sana capture (3 prompts, 3 steps, its pipeline's classifier-free guidance: the uncond branch's
text is padding, masked through ``encoder_attention_mask``, an input of the compiled program) and one tiny
FLUX capture (2 steps, no guidance).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import example
from fbqc.cli import main
from fbqc.errors import UserError
from fbqc.eval_run import evaluate
from fbqc.eval_targets import Student

PROMPTS = ["a red cat sitting on a wooden table in the morning light",
           "a blue house near the sea at sunset with many clouds",
           "a small robot reading a book in an old library room"]


@pytest.fixture(scope="module")
def caps(tmp_path_factory):
    from fbqc.capture import capture

    root = tmp_path_factory.mktemp("eval")
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    out = {}
    for arch, kw in (("sana", dict(steps=3)), ("flux_schnell", dict(steps=2, num_prompts=2))):
        out[arch] = root / f"cap_{arch}"
        capture(example(arch), root / "p.txt", out[arch], **kw)
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def float_eval(caps):
    return evaluate(None, caps["sana"], caps["root"] / "e_float", float_model=True, progress=False,
                    log=lambda s: None)


def test_float_model_drift_zero_psnr_inf(caps, float_eval):
    r = float_eval
    assert r["target"]["kind"] == "float" and r["aggregate"]["failed"] == 0
    assert len(r["prompts"]) == 3
    for p in r["prompts"]:
        d = p["drift"]
        assert d["step"] == [0, 1, 2]
        assert d["hidden_states_mse"] == [0.0] * 3 and d["output_mse"] == [0.0] * 3
        assert d["hidden_states_cosine"] == pytest.approx([1.0] * 3) and p["final_latent_mse"] == 0.0
        assert p["psnr"] == "inf" and p["psnr_infinite"] and p["ssim"] == pytest.approx(1.0)
        student = np.asarray(Image.open(caps["root"] / "e_float" / p["image"]))
        teacher = np.asarray(Image.open(p["teacher_image"]))
        assert np.array_equal(student, teacher)
    on_disk = json.loads((caps["root"] / "e_float" / "eval.json").read_text())
    assert on_disk["kind"] == "fbqc-eval" and on_disk["aggregate"]["psnr_mean"] == "inf"


def test_metric_is_live_and_report(caps, float_eval):
    def wrap(teacher):                        # the teacher's output, 2 % too large
        return lambda **kw: [teacher(**kw)[0] * 1.02]
    student = Student("custom", {"kind": "custom", "note": "float x 1.02"}, None, wrap=wrap)
    out = caps["root"] / "e_perturbed"
    r = evaluate(student, caps["sana"], out, progress=False, log=lambda s: None, num_prompts=2)
    for p in r["prompts"]:
        assert isinstance(p["psnr"], float) and 10 < p["psnr"] < 80
        assert p["drift"]["hidden_states_mse"][0] == 0.0 and p["drift"]["hidden_states_mse"][-1] > 0
        assert p["final_latent_mse"] > 0
    # independent PSNR from the PNGs
    p = r["prompts"][0]
    s = np.asarray(Image.open(out / p["image"])).astype(np.float64) / 255
    t = np.asarray(Image.open(p["teacher_image"])).astype(np.float64) / 255
    assert p["psnr"] == pytest.approx(10 * np.log10(1.0 / np.mean((s - t) ** 2)), rel=1e-5)
    html = (caps["root"] / "e_float" / "report.html").read_text()
    assert html.count("class='row'") == 3
    srcs = re.findall(r"src=['\"]([^'\"]*)", html)
    assert srcs and all(x.startswith("data:image/png;base64,") for x in srcs)
    assert len(srcs) == 1 + 3 * 3                       # drift plot + teacher|student|diff per prompt
    assert "× 4" in html and "∞" in html


def test_non_finite_student_fails_prompt_and_exit_code(caps, monkeypatch):
    from fbqc import eval_run

    def wrap(teacher):                        # NaN from the second transformer call (step 1) on
        calls = []

        def run(**kw):
            calls.append(1)
            out = teacher(**kw)[0]
            return [out * float("nan") if len(calls) >= 2 else out]
        return run

    def fake_load(target, **kw):
        return Student("custom", {"kind": "custom"}, None, wrap=wrap)
    monkeypatch.setattr(eval_run, "load_student", fake_load)
    res = CliRunner().invoke(main, ["eval", "--float", "--data", str(caps["sana"]), "-o",
                                    str(caps["root"] / "e_nan"), "-q", "--num-prompts", "1"])
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.output
    r = json.loads((caps["root"] / "e_nan" / "eval.json").read_text())
    p = r["prompts"][0]
    assert p["status"] == "failed" and p["failed_step"] == 1 and p.get("psnr") is None
    assert r["aggregate"]["failed"] == 1 and r["aggregate"]["psnr_mean"] is None


@pytest.mark.parametrize("arch", ["sana", "flux_schnell"])
def test_w8_ptq_beats_w4(caps, compiled, arch):
    res = {}
    for bits in (8, 4):
        art, _ = compiled(arch, float(bits))
        args = ["eval", str(art), "--data", str(caps[arch]), "-o", str(caps["root"] / f"e_{arch}_w{bits}"), "--json"]
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 0, out.output
        res[bits] = json.loads(out.output[out.output.index("{"):])
        assert res[bits]["target"]["kind"] == "artifact" and res[bits]["warnings"] == []
    a8, a4 = res[8]["aggregate"], res[4]["aggregate"]
    assert a8["psnr_mean"] > a4["psnr_mean"] and a8["final_latent_mse_mean"] < a4["final_latent_mse_mean"]
    # (SSIM on these random-weight images, 3 steps and 3 prompts, is within noise: not ranked here)


def test_qat_run_target_and_fid_needs_two(caps, tmp_path):
    from fbqc.qat.model_file import train_model_file

    run = tmp_path / "run"
    train_model_file(example("sana"), run, steps=3, bits=4.0, progress=False, log=lambda s: None)
    feat = tmp_path / "feat.pt"
    torch.jit.save(torch.jit.script(_Feat()), str(feat))
    lines = []
    r = evaluate(run, caps["sana"], tmp_path / "e_qat", num_prompts=1, fid_features=feat, progress=False,
                 log=lines.append)
    assert r["target"]["kind"] == "qat" and r["target"]["act_quant"] == "dynamic"
    p = r["prompts"][0]
    assert p["status"] == "ok" and isinstance(p["psnr"], float) and p["final_latent_mse"] > 0
    assert "at least 2 images" in r["skipped"]["fid"] and "fid" not in r["aggregate"]


class _Feat(torch.nn.Module):
    """A tiny feature network: uint8 (N, 3, H, W) → (N, 2)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.conv(x.to(torch.float32) / 255.0))
        return y.mean(dim=(2, 3)) * 10


def test_fid_equals_independent_frechet_and_skip_hints(caps, compiled, tmp_path):
    import scipy.linalg

    feat = tmp_path / "feat.pt"
    net = _Feat()
    torch.jit.save(torch.jit.script(net), str(feat))
    art, _ = compiled("sana", 3.0)
    lines = []
    r = evaluate(art, caps["sana"], tmp_path / "e_fid", fid_features=feat, progress=False, log=lines.append)
    assert set(r["skipped"]) == {"clip", "lpips"}
    assert [ln for ln in lines if "skipped" in ln] == [r["skipped"]["clip"], r["skipped"]["lpips"]]
    assert "--clip" in r["skipped"]["clip"] and "--lpips" in r["skipped"]["lpips"]

    def features(paths):
        imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
                            for p in paths])
        with torch.no_grad():
            return net(imgs).double().numpy()
    fs = features([tmp_path / "e_fid" / p["image"] for p in r["prompts"]])
    ft = features([p["teacher_image"] for p in r["prompts"]])
    mu1, mu2, s1, s2 = fs.mean(0), ft.mean(0), np.cov(fs, rowvar=False), np.cov(ft, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert want > 0
    assert r["aggregate"]["fid"] == pytest.approx(want, rel=1e-3, abs=1e-6)


def test_force_refuses_foreign_directory(caps, float_eval, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--force"):
        evaluate(None, caps["sana"], foreign, float_model=True, force=True, progress=False, log=lambda s: None)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="exists"):
        evaluate(None, caps["sana"], caps["root"] / "e_float", float_model=True, progress=False,
                 log=lambda s: None)
    r = evaluate(None, caps["sana"], caps["root"] / "e_float", float_model=True, force=True, num_prompts=1,
                 progress=False, log=lambda s: None)                 # an fbqc eval directory: replaced
    assert len(json.loads((caps["root"] / "e_float" / "eval.json").read_text())["prompts"]) == 1
    assert r["aggregate"]["psnr_mean"] == "inf"


def test_htp_artifact_on_the_simulator(caps, compiled):
    """The context binary runs in the pipeline on the x86 HTP simulator (fp16 float ops there): its images
    are close to the cpu reference's for the same W4A8 model."""
    res = {}
    for target in ("cpu", "htp"):
        art, _ = compiled("sana", 4.0, target=target)
        res[target] = evaluate(art, caps["sana"], caps["root"] / f"e_sana_{target}", num_prompts=1,
                               progress=False, log=lambda s: None)
        assert res[target]["target"]["backend"] == target and res[target]["warnings"] == []
    cpu, htp = res["cpu"]["prompts"][0], res["htp"]["prompts"][0]
    assert htp["status"] == "ok" and abs(htp["psnr"] - cpu["psnr"]) < 3.0
    assert htp["final_latent_cosine"] > 0.99


def _perturbed_student(monkeypatch):
    """``fbqc eval --float`` gets a student whose transformer output is 2 % too large (images ≠ the teacher's)."""
    from fbqc import eval_run

    def wrap(teacher):
        return lambda **kw: [teacher(**kw)[0] * 1.02]
    monkeypatch.setattr(eval_run, "load_student",
                        lambda target, **kw: Student("custom", {"kind": "custom", "note": "x 1.02"}, None, wrap=wrap))


def _png(path) -> Image.Image:
    with Image.open(path) as f:
        return f.convert("RGB")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny seeded CLIP (text + vision, 32 wide, 2 layers, 32 px images, patch 8) with its processor
    (the examples' offline CLIP word-level tokenizer), saved with ``save_pretrained``."""
    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    import _pipelines as P

    image_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    text = dict(vocab_size=P.vocab_size("clip"), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, **P._ids("clip"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    with P.seeded(0):
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = CLIPProcessor(image_processor=image_processor(size={"shortest_edge": 32},
                                                              crop_size={"height": 32, "width": 32}),
                              tokenizer=P.tokenizer("clip", 77))
    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def test_clip_score_local_model_equals_independent_cosine(caps, clip_dir, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    from fbqc.image_metrics import SKIP_HINT

    _perturbed_student(monkeypatch)
    out = caps["root"] / "e_clip"
    res = CliRunner().invoke(main, ["eval", "--float", "--data", str(caps["sana"]), "-o", str(out), "-q",
                                    "--clip", str(clip_dir)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "eval.json").read_text())
    assert r["skipped"] == {"fid": SKIP_HINT["fid"], "lpips": SKIP_HINT["lpips"]}
    rows = r["prompts"]
    assert [p["prompt"] for p in rows] == PROMPTS and all(p["status"] == "ok" for p in rows)

    # independent: CLIPModel.forward's normalized image_embeds / text_embeds of the PNGs and the prompts, one batch
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)

    def scores(paths):
        inputs = processor(text=PROMPTS, images=[_png(p) for p in paths], return_tensors="pt", padding=True)
        with torch.no_grad():
            o = model(**inputs)
        cos = (o.image_embeds / o.image_embeds.norm(dim=-1, keepdim=True)
               * o.text_embeds / o.text_embeds.norm(dim=-1, keepdim=True)).sum(-1)
        return (100 * cos.clamp(min=0)).tolist()
    want = {"student": scores([out / p["image"] for p in rows]),
            "teacher": scores([p["teacher_image"] for p in rows])}
    for who in ("student", "teacher"):
        got = [p[f"clip_score_{who}"] for p in rows]
        assert got == pytest.approx(want[who], abs=1e-3)
        assert r["aggregate"][f"clip_score_{who}"] == pytest.approx(float(np.mean(want[who])), abs=1e-3)
    assert any(x > 0 for x in want["student"])                           # not all clamped to 0
    assert want["student"] != pytest.approx(want["teacher"], abs=1e-6)   # the student's images differ
    assert f"CLIP score (student){r['aggregate']['clip_score_student']:.4f}" in res.output


class _MeanAbs(torch.nn.Module):
    """A stand-in LPIPS: mean |img1 − img2| per image, (N,)."""

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        return (img1 - img2).abs().mean(dim=(1, 2, 3))


def test_lpips_torchscript_equals_independent_distance(caps, monkeypatch, tmp_path):
    from fbqc.image_metrics import SKIP_HINT

    net = tmp_path / "lpips.pt"
    torch.jit.save(torch.jit.script(_MeanAbs()), str(net))
    _perturbed_student(monkeypatch)
    out = tmp_path / "e_lpips"
    res = CliRunner().invoke(main, ["eval", "--float", "--data", str(caps["sana"]), "-o", str(out), "-q",
                                    "--num-prompts", "2", "--lpips", str(net)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "eval.json").read_text())
    assert r["skipped"] == {"fid": SKIP_HINT["fid"], "clip": SKIP_HINT["clip"]}
    want = []
    for p in r["prompts"]:
        s = np.asarray(_png(out / p["image"])).astype(np.float64) / 127.5 - 1
        t = np.asarray(_png(p["teacher_image"])).astype(np.float64) / 127.5 - 1
        want.append(float(np.abs(s - t).mean()))
    assert len(want) == 2 and all(w > 0 for w in want)
    assert [p["lpips"] for p in r["prompts"]] == pytest.approx(want, rel=1e-5)
    assert r["aggregate"]["lpips"] == pytest.approx(float(np.mean(want)), rel=1e-5)
    assert f"LPIPS    {r['aggregate']['lpips']:.4f}" in res.output

    class Spatial(torch.nn.Module):                   # a per-pixel map, not one distance per pair: refused
        def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
            return (img1 - img2).abs()
    torch.jit.save(torch.jit.script(Spatial()), str(tmp_path / "spatial.pt"))
    with pytest.raises(UserError, match="one distance per pair"):
        evaluate(None, caps["sana"], tmp_path / "e_spatial", float_model=True, num_prompts=1,
                 lpips=tmp_path / "spatial.pt", progress=False, log=lambda s: None)
