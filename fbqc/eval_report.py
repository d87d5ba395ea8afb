"""``report.html`` of ``fbqc eval``: one self-contained file (images as base64 data URIs, no external src).

Layout: a header table (target, capture, settings, aggregate metrics, skipped metrics, warnings); a
plot of the latent drift against the denoising step (MSE and 1 − cosine of the cond branch's
``hidden_states``, log scale, one line per prompt; matplotlib, embedded as PNG); then one row per
prompt: its text, then teacher | student | |student − teacher| × 4 with PSNR / SSIM under them (a
failed prompt shows the step where its output became NaN/Inf instead). Images larger than 512 px are
embedded downscaled (box filter) to keep the file small; the full-size PNGs are in ``images/``.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from . import image_metrics as im

AMPLIFY = 4
MAX_SIDE = 512          # images are embedded at most this large (full size: EVAL_DIR/images, the capture)
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table.h{border-collapse:collapse;margin-bottom:16px}table.h td{padding:3px 10px;border-bottom:1px solid #ddd;
vertical-align:top}table.h td:first-child{font-weight:600;white-space:nowrap}
.row{border-top:1px solid #ccc;padding:12px 0}.prompt{font-style:italic;margin-bottom:6px}
.imgs{display:flex;gap:12px}.imgs figure{margin:0;text-align:center;font-size:13px}
.imgs img{width:256px;height:auto;image-rendering:pixelated;border:1px solid #aaa}
.failed{color:#b00;font-weight:600}.warn{color:#a60}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray(arr)
    if max(img.size) > MAX_SIDE:
        scale = MAX_SIDE / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BOX)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _load(path: Path) -> np.ndarray | None:
    from PIL import Image

    if not path.is_file():
        return None
    with Image.open(path) as f:
        return np.asarray(f.convert("RGB"))


def diff_image(student: np.ndarray, teacher: np.ndarray, amplify: int = AMPLIFY) -> np.ndarray:
    """|student − teacher| × amplify, clipped to 0–255 (uint8, per channel)."""
    d = np.abs(student.astype(np.int32) - teacher.astype(np.int32)) * amplify
    return np.clip(d, 0, 255).astype(np.uint8)


def drift_plot(rows: list[dict[str, Any]]) -> bytes | None:
    """PNG: MSE and 1 − cosine of the cond branch's hidden_states vs step (log y), one line per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [r for r in rows if r.get("drift", {}).get("step")]
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    floor = 1e-12                     # step 0 (same latents) and a float student are exactly 0: shown at the floor
    for r in series:
        d = r["drift"]
        label = f"#{r['index']}" + (" (failed)" if r["status"] != "ok" else "")
        mse = [max(float(x), floor) if x is not None else np.nan for x in d["hidden_states_mse"]]
        one_minus = [max(1.0 - float(x), floor) if x is not None else np.nan for x in d["hidden_states_cosine"]]
        axes[0].plot(d["step"], mse, marker="o", ms=3, label=label)
        axes[1].plot(d["step"], one_minus, marker="o", ms=3, label=label)
    for ax, title in zip(axes, ("latent MSE vs teacher", "1 − cosine vs teacher")):
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("denoising step")
        ax.set_title(title + f" (floor {floor:g} = identical)", fontsize=10)
        ax.grid(alpha=0.3)
    if len(series) <= 12:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float) or v == "inf":
        return im.fmt(v, 4)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items() if x not in (None, (), [], {}))
    return "–" if v is None else str(v)


def render(result: dict[str, Any], out_dir: Path, teacher_image) -> str:
    """The report's HTML. ``teacher_image(index) -> Path`` of the teacher's PNG."""
    e = html.escape
    agg = result["aggregate"]
    head = [("target", _fmt(result["target"])), ("capture", _fmt(result["capture"])),
            ("settings", _fmt(result["settings"])),
            ("prompts", f"{agg['prompts']} ({agg['failed']} failed)"),
            ("mean PSNR", f"{im.fmt(agg['psnr_mean'])} dB ({agg['psnr_identical_images']} identical images)"),
            ("mean SSIM", im.fmt(agg["ssim_mean"], 4)),
            ("final latent MSE / cosine", f"{_fmt(agg['final_latent_mse_mean'])} / "
                                          f"{_fmt(agg['final_latent_cosine_mean'])}")]
    head += [(k, _fmt(agg[k])) for k in ("fid", "lpips", "clip_score_student", "clip_score_teacher") if k in agg]
    head += [("skipped", "<br>".join(e(v) for v in result["skipped"].values()) or "–")]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>fbqc eval</title>",
             f"<style>{CSS}</style></head><body><h1>fbqc eval</h1><table class='h'>"]
    parts += [f"<tr><td>{e(k)}</td><td>{v if k == 'skipped' else e(v)}</td></tr>" for k, v in head]
    parts.append("</table>")
    for w in result.get("warnings", []):
        parts.append(f"<p class='warn'>warning: {e(w)}</p>")
    plot = drift_plot(result["prompts"])
    if plot:
        parts.append(f"<h2>Latent drift vs denoising step</h2><img alt='latent drift' src='{_data_uri(plot)}'>")
    parts.append(f"<h2>Images</h2><p>teacher | student | |student − teacher| × {AMPLIFY} (per channel, "
                 f"clipped at 255; embedded at most {MAX_SIDE} px, full size in images/)</p>")
    for r in result["prompts"]:
        parts.append(f"<div class='row' id='p{r['index']}'><div class='prompt'>#{r['index']}: "
                     f"{e(r['prompt'])} <small>(seed {r['seed']})</small></div>")
        teacher = _load(Path(teacher_image(r["index"])))
        student = _load(out_dir / r["image"]) if r.get("image") else None
        figs = []
        if teacher is not None:
            figs.append(("teacher", teacher, ""))
        if r["status"] != "ok":
            parts.append(f"<div class='failed'>FAILED: {e(str(r.get('error')))} at step "
                         f"{r.get('failed_step')}</div>")
        elif student is not None:
            figs.append(("student", student, f"PSNR {im.fmt(r['psnr'])} dB, SSIM {im.fmt(r['ssim'], 4)}"))
            if teacher is not None and teacher.shape == student.shape:
                figs.append((f"|diff| × {AMPLIFY}", diff_image(student, teacher),
                             f"final latent MSE {_fmt(r['final_latent_mse'])}"))
        parts.append("<div class='imgs'>" + "".join(
            f"<figure><img alt='{e(n)}' src='{_data_uri(_png(a))}'><figcaption>{e(n)}<br>{e(c)}"
            f"</figcaption></figure>" for n, a, c in figs) + "</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: Path, result: dict[str, Any], traj) -> Path:
    path = Path(out_dir) / "report.html"
    path.write_text(render(result, Path(out_dir), traj.image_path), encoding="utf-8")
    return path
