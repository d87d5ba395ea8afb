"""``fbqc eval TARGET --data CAPTURE -o EVAL_DIR``: images of a student vs the teacher's (DESIGN.md §6a).

Only click is imported here; the work (torch, diffusers, torchmetrics) is imported when the command runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .cli_options import _progress


def summary_text(r: dict[str, Any]) -> str:
    from .image_metrics import fmt
    from .summaries import table

    agg = r["aggregate"]
    rows = [[p["index"], (p["prompt"][:40] + "…") if len(p["prompt"]) > 41 else p["prompt"],
             fmt(p.get("psnr")) if p["status"] == "ok" else "FAILED",
             fmt(p.get("ssim"), 4) if p["status"] == "ok" else f"step {p.get('failed_step')}",
             f"{p['final_latent_mse']:.3g}" if p["status"] == "ok" else "–",
             f"{p['final_latent_cosine']:.6f}" if p["status"] == "ok" else "–"] for p in r["prompts"]]
    lines = [table(["#", "prompt", "PSNR dB", "SSIM", "final MSE", "final cos"], rows), ""]
    t = r["target"]
    lines.append(f"target   {t.get('kind')}: " + ", ".join(f"{k}={v}" for k, v in t.items()
                                                            if k != "kind" and v is not None))
    mse = agg["final_latent_mse_mean"]
    lines.append(f"mean     PSNR {fmt(agg['psnr_mean'])} dB ({agg['psnr_identical_images']} identical), "
                 f"SSIM {fmt(agg['ssim_mean'], 4)}, final latent MSE "
                 f"{'–' if mse is None else f'{mse:.3g}'} over {agg['ok']} of {agg['prompts']} prompts")
    for k, name in (("fid", "FID"), ("lpips", "LPIPS"), ("clip_score_student", "CLIP score (student)"),
                    ("clip_score_teacher", "CLIP score (teacher)")):
        if agg.get(k) is not None:
            lines.append(f"{name:<9}{agg[k]:.4f}" if isinstance(agg[k], float) else f"{name} {agg[k]}")
    if agg["failed"]:
        lines.append(f"FAILED   {agg['failed']} prompt(s) produced NaN/Inf (see eval.json)")
    for w in r["warnings"]:
        lines.append(f"warning  {w}")
    lines.append(f"wrote    {r['out']}/eval.json, report.html, images/")
    return "\n".join(lines)


@click.command("eval")
@click.argument("target", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Capture directory (fbqc capture): its prompts, seeds, settings and teacher images.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Evaluation directory [default: eval/<target name>].")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None,
              help="Evaluate the first N captured prompts [default: all].")
@click.option("--float", "float_model", is_flag=True,
              help="Evaluate the float model itself (the capture's model file): drift 0, PSNR ∞.")
@click.option("--fake-quant", is_flag=True, help="Artifact TARGET: evaluate its fake-quant model (rebuilt "
              "from the manifest's model file and flags) instead of the backend's program.")
@click.option("--fid-features", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TorchScript feature network for FID: uint8 (N,3,H,W) 0–255 → (N,D), e.g. the FID "
                   "Inception inception-2015-12-05.pt.")
@click.option("--clip", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local transformers CLIP model directory for CLIP score.")
@click.option("--lpips", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TorchScript LPIPS module (img1, img2 in [-1,1]) -> distance.")
@click.option("--force", is_flag=True, help="Replace an existing evaluation directory (only an fbqc one).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines; just the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print eval.json's content.")
@click.pass_context
def eval_cmd(ctx, target, data, output, num_prompts, float_model, fake_quant, fid_features, clip, lpips,
             force, quiet, as_json):
    """Run the capture's prompts through the pipeline with TARGET as its transformer and compare with
    the teacher: PSNR/SSIM of the images, latent drift per step; report.html.

    TARGET: a training run (fbqc train -o RUN), a compiled artifact (fbqc compile -o OUT: cpu runs the
    INTEGER program, htp the context binary on the simulator), or a model file / --float."""
    from .cli_options import _emit
    from .eval_run import evaluate

    if target is None and not float_model:
        raise click.UsageError("give TARGET (a run or artifact directory) or --float")
    name = (target.stem if target is not None and target.is_file() else target.resolve().name) \
        if target is not None else "float"
    out = output or Path("eval") / name
    quiet = quiet or as_json
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    result = evaluate(target, data, out, num_prompts=num_prompts, fake_quant=fake_quant,
                      float_model=float_model, fid_features=fid_features, clip=clip, lpips=lpips,
                      force=force, progress=_progress(quiet), log=log)
    _emit(ctx, result, summary_text(result))
    if result["aggregate"]["failed"]:
        ctx.exit(1)
