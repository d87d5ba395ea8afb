"""Images, not tensors: W4A8 students of the tiny seed architectures scored against their teacher's images.

    python benchmarks/image_quality.py [--archs sana flux_schnell] [--calib-prompts 32] [--eval-prompts 8]
                                       [--qat-steps 200] [--lr 1e-4] [--json results.json]

Per architecture (tiny preset, its pipeline's own settings): ``fbqc capture`` of the calibration prompts
(``examples/prompts/calib.txt``) and, separately, of the evaluation prompts (``eval.txt``, none shared);
then four students, each evaluated with ``fbqc eval`` on the evaluation capture (same prompts, seeds and
initial latents as the teacher; only the transformer swapped; cpu INTEGER artifacts):

- ``W8 PTQ captured``: 8-bit weights, calibrated on captured trajectories (a reference point);
- ``W4 PTQ synthetic``: calibrated on the model file's synthetic ``calibration_data()`` (what fbqc did before);
- ``W4 PTQ captured``: calibrated on ``--calib-samples`` records spread over steps, prompts, branches;
- ``W4 QAT fractional``: ``fbqc train --data`` (the paper's fractional schedule, ``--qat-steps``), then
  compiled with the captured calibration.

Prints a markdown table: PSNR / SSIM of the images and the final latent's MSE and cosine vs the teacher
(means over the evaluation prompts), and the wall time of each part.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["sana", "pixart_sigma", "sd35_medium", "flux_schnell"]
PROMPTS = ROOT / "examples" / "prompts"


def _fmt(x, digits=2) -> str:
    if x is None:
        return "–"
    if x == "inf":
        return "∞"
    return f"{x:.{digits}f}" if abs(x) >= 1e-2 else f"{x:.2e}"


def run_arch(arch: str, tmp: Path, args) -> list[dict]:
    from fbqc.capture import capture
    from fbqc.eval_run import evaluate
    from fbqc.pipeline import CompileOptions, compile_model
    from fbqc.qat.model_file import compile_run, train_model_file

    quiet = lambda s: None  # noqa: E731
    model_file = ROOT / "examples" / f"{arch}.py"
    t = time.perf_counter()
    calib, held_out = tmp / f"{arch}-calib", tmp / f"{arch}-eval"
    capture(model_file, PROMPTS / "calib.txt", calib, num_prompts=args.calib_prompts, log=quiet)
    capture(model_file, PROMPTS / "eval.txt", held_out, num_prompts=args.eval_prompts, log=quiet)
    capture_s = time.perf_counter() - t

    students = {}
    for name, bits, data in (("W8 PTQ captured", 8.0, calib), ("W4 PTQ synthetic", 4.0, None),
                             ("W4 PTQ captured", 4.0, calib)):
        t = time.perf_counter()
        out = tmp / f"{arch}-{name.replace(' ', '_')}"
        compile_model(model_file, out, CompileOptions(bits=bits, calib_samples=args.calib_samples,
                                                      calib_data=str(data) if data else None),
                      progress=False, log=quiet)
        students[name] = (out, time.perf_counter() - t)
    t = time.perf_counter()
    run_dir = tmp / f"{arch}-run"
    train_model_file(model_file, run_dir, schedule="fractional", steps=args.qat_steps, bits=4.0, lr=args.lr,
                     data_dir=str(calib.resolve()), progress=False, log=quiet, report=False)
    qat = tmp / f"{arch}-qat"
    compile_run(run_dir, qat, progress=False, log=quiet, calib_data=str(calib), calib_samples=args.calib_samples)
    students["W4 QAT fractional"] = (qat, time.perf_counter() - t)

    rows = []
    for name, (art, build_s) in students.items():
        t = time.perf_counter()
        r = evaluate(art, held_out, tmp / f"{arch}-eval-{name.replace(' ', '_')}", progress=False, log=quiet)
        a = r["aggregate"]
        rows.append({"arch": arch, "student": name, "psnr": a["psnr_mean"], "ssim": a["ssim_mean"],
                     "final_mse": a["final_latent_mse_mean"], "final_cos": a["final_latent_cosine_mean"],
                     "failed": a["failed"], "warnings": len(r.get("warnings", [])),
                     "build_s": round(build_s, 1), "eval_s": round(time.perf_counter() - t, 1),
                     "capture_s": round(capture_s, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=ARCHS)
    ap.add_argument("--calib-prompts", type=int, default=32)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()

    print("| model (tiny) | student | PSNR dB | SSIM | final-latent MSE | final-latent cosine | "
          "failed | warnings | build s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for r in run_arch(arch, Path(tmp), args):
                rows.append(r)
                print(f"| {arch} | {r['student']} | {_fmt(r['psnr'])} | {_fmt(r['ssim'], 4)} | "
                      f"{_fmt(r['final_mse'], 4)} | {_fmt(r['final_cos'], 5)} | {r['failed']} | {r['warnings']} | "
                      f"{r['build_s']} | {r['eval_s']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
