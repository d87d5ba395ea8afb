"""``fbqc eval``: the capture's prompts through the pipeline with a student transformer, scored against
the teacher's trajectory and images.

Per captured prompt the capture's pipeline (model file + options from its manifest) runs with the same
prompt, seed and call settings; only ``pipe.transformer`` is swapped for the student
(:mod:`fbqc.eval_targets`). The capture's :class:`fbqc.capture.Recorder` records the student's transformer
calls (batch split into ``uncond``/``cond`` as in the capture) and the VAE decoder's input. The initial
latents must equal the capture's step-0 ``hidden_states`` (cond branch) — else an error: the capture
and this pipeline disagree on seed or settings, and no comparison would mean anything.

Written (to a temporary directory, renamed into place): ``eval.json``, ``images/NNNNN.png`` (student)
and ``report.html`` (:mod:`fbqc.eval_report`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import image_metrics as im
from .errors import UserError
from .eval_targets import EvalError, NonFinite, Student, load_student
from .trajectories import Trajectories

KIND, FORMAT = "fbqc-eval", 1
COND = "cond"


# ---- the capture's pipeline and settings ---------------------------------------------------------


def capture_source(traj: Trajectories) -> tuple[str, dict[str, Any]]:
    """(model file, its options) the capture ran."""
    m = traj.manifest.get("model", {})
    path = m.get("file_resolved") or m.get("model_file_resolved") or m.get("file") or m.get("model_file")
    if not path:
        raise EvalError(f"{traj.dir}/manifest.json records no model file; recapture with fbqc capture")
    if not Path(path).is_file() and m.get("file") and Path(m["file"]).is_file():
        path = m["file"]
    if not Path(path).is_file():
        raise EvalError(f"the capture's model file {path} is gone; fbqc eval rebuilds its pipeline from it")
    opts = {k: v for k, v in (m.get("opts") or {}).items() if k in ("preset", "checkpoint") and v is not None}
    return str(path), opts


def call_settings(traj: Trajectories) -> dict[str, Any]:
    """The pipeline call's keyword arguments (without prompt and generator) the capture used."""
    m = traj.manifest
    call = m.get("call", {})
    for source in (call.get("kwargs"), call.get("settings"), m.get("generation"), m.get("settings"),
                   m.get("pipeline", {}).get("call") if isinstance(m.get("pipeline"), dict) else None):
        if isinstance(source, dict) and source:
            kw = dict(source)
            break
    else:
        raise EvalError(f"{traj.dir}/manifest.json records no pipeline call settings; recapture with fbqc capture")
    for k in ("prompt", "generator", "callback_on_step_end"):
        kw.pop(k, None)
    kw["output_type"] = "pil"
    kw["num_images_per_prompt"] = 1
    return kw


# ---- one prompt ----------------------------------------------------------------------------------


def _set_transformer(pipe, module) -> None:
    object.__setattr__(pipe, "transformer", module)     # not DiffusionPipeline.__setattr__: config untouched


def run_prompt(pipe, adapter, entry: dict[str, Any], kwargs: dict[str, Any]):
    """(Recorder, PIL image or None, failure {"step", "error"} or None, seconds)."""
    from .recorder import Recorder, generate

    teacher = pipe.transformer
    _set_transformer(pipe, adapter)
    rec = Recorder(pipe, lambda s: f"prompt {entry['index']} step {s}")
    t0 = time.perf_counter()
    image = failed = None
    try:
        with rec, torch.inference_mode():
            image = generate(pipe, entry["prompt"], entry["seed"], kwargs)
        if rec.final is not None and not bool(torch.isfinite(rec.final).all()):
            failed = {"step": len(rec.steps), "error": "non-finite final latents"}
    except NonFinite as e:
        branches = entry.get("branches") or [COND]
        complete = not rec.steps or set(rec.steps[-1]) >= set(branches)
        failed = {"step": len(rec.steps) if complete else len(rec.steps) - 1, "error": f"{e.what} is NaN/Inf"}
    finally:
        _set_transformer(pipe, teacher)
    return rec, image, failed, time.perf_counter() - t0


def _drift_arrays(traj: Trajectories, entry: dict[str, Any], rec) -> dict[str, list]:
    p = entry["index"]
    d: dict[str, list] = {k: [] for k in ("step", "timestep", "hidden_states_mse", "hidden_states_cosine",
                                          "output_mse", "output_cosine")}
    for s, st in enumerate(rec.steps[:entry["steps"]]):
        i = traj.find(p, s, COND)
        if COND not in st or i is None:
            continue
        hs, hs_t = st[COND]["inputs"]["hidden_states"], traj.flat_inputs(i)["hidden_states"]
        m1, c1 = im.drift(hs, hs_t)
        m2, c2 = im.drift(st[COND]["output"], traj.target(i))
        d["step"].append(s)
        d["timestep"].append(entry["timesteps"][s])
        for k, v in zip(("hidden_states_mse", "hidden_states_cosine", "output_mse", "output_cosine"),
                        (m1, c1, m2, c2)):
            d[k].append(v)
    return d


def _check_start(traj: Trajectories, entry: dict[str, Any], rec) -> None:
    p = entry["index"]
    first = traj.find(p, 0, COND)
    if not rec.steps or COND not in rec.steps[0] or first is None:
        raise EvalError(f"prompt {p}: no cond-branch transformer call at step 0 to compare with the capture")
    got = rec.steps[0][COND]["inputs"]["hidden_states"]
    want = traj.flat_inputs(first)["hidden_states"]
    if got.shape != want.shape or not torch.equal(got, want):
        raise EvalError(f"prompt {p}: the initial latents differ from the capture's step-0 hidden_states "
                        f"(seed, resolution or pipeline changed since the capture; recapture, or evaluate "
                        f"with the capture's model file and options)")


def evaluate_prompt(pipe, student: Student, traj: Trajectories, entry: dict[str, Any],
                    kwargs: dict[str, Any], images_dir: Path) -> tuple[dict[str, Any], torch.Tensor | None, list[str]]:
    """(per-prompt result, student image as (1, 3, H, W) uint8 or None, adapter warnings)."""
    adapter = student.adapter(pipe.transformer)
    rec, image, failed, seconds = run_prompt(pipe, adapter, entry, kwargs)
    p = entry["index"]
    row: dict[str, Any] = {"index": p, "prompt": entry["prompt"], "seed": entry["seed"], "status": "ok",
                           "seconds": seconds, "teacher_image": str(traj.image_path(p))}
    if rec.steps:
        _check_start(traj, entry, rec)
    row["drift"] = _drift_arrays(traj, entry, rec)
    if failed:
        row.update(status="failed", failed_step=failed["step"], error=failed["error"])
        return row, None, adapter.warnings
    if len(rec.steps) != entry["steps"]:
        raise EvalError(f"prompt {p}: the student ran {len(rec.steps)} denoising steps, the capture "
                        f"{entry['steps']} (the call settings differ)")
    mse, cos = im.drift(rec.final, traj.final_latents(p))
    row.update(final_latent_mse=mse, final_latent_cosine=cos)
    name = f"{p:05d}.png"
    image.save(images_dir / name, format="PNG")
    from PIL import Image

    with Image.open(images_dir / name) as f:
        student_u8 = im.image_tensor(f)
    with Image.open(traj.image_path(p)) as f:
        teacher_u8 = im.image_tensor(f)
    psnr, ssim = im.psnr_ssim(student_u8, teacher_u8)
    row.update(image=f"images/{name}", psnr=im.json_float(psnr), psnr_infinite=psnr == float("inf"), ssim=ssim)
    return row, student_u8, adapter.warnings


# ---- the whole evaluation ------------------------------------------------------------------------


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    finite = [r["psnr"] for r in ok if isinstance(r.get("psnr"), float)]
    inf = sum(1 for r in ok if r.get("psnr_infinite"))
    return {"prompts": len(rows), "ok": len(ok), "failed": len(rows) - len(ok),
            "psnr_mean": ("inf" if ok and inf == len(ok) else im.mean(finite)), "psnr_identical_images": inf,
            "ssim_mean": im.mean([r["ssim"] for r in ok]),
            "final_latent_mse_mean": im.mean([r["final_latent_mse"] for r in ok]),
            "final_latent_cosine_mean": im.mean([r["final_latent_cosine"] for r in ok])}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return im.json_float(v)
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


def evaluate(target: str | Path | None, data: str | Path, out: str | Path, *, num_prompts: int | None = None,
             fake_quant: bool = False, float_model: bool = False, fid_features: str | Path | None = None,
             clip: str | Path | None = None, lpips: str | Path | None = None, force: bool = False,
             progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``target`` on the capture ``data``; writes ``out`` and returns eval.json's content.

    ``target``: a run or artifact directory, a model file, ``None`` with ``float_model``, or a
    :class:`fbqc.eval_targets.Student` (any callable transformer, e.g. from Python)."""
    from .capture import load_pipeline
    from .outputs import check_writable, staging

    t0 = time.perf_counter()
    out = Path(out)
    if progress:
        log = tqdm.write
    check_writable(out, force, "eval")                           # before minutes of work
    traj = Trajectories(data)
    for flag, path in (("--fid-features", fid_features), ("--lpips", lpips), ("--clip", clip)):
        if path is not None and not Path(path).exists():
            raise UserError(f"{flag} {path}: no such file or directory")
    model_file, opts = capture_source(traj)
    if float_model and target is None:
        target = model_file
    student = target if isinstance(target, Student) else \
        load_student(target, fake_quant=fake_quant, float_model=float_model, log=log)
    warnings = list(student.warnings)
    if student.model_file and Path(student.model_file).resolve() != Path(model_file).resolve():
        warnings.append(f"the target was built from {student.model_file}, the capture from {model_file}: "
                        f"the teacher and the student's float model may differ")
    _mf, pipe, _defaults = load_pipeline(model_file, opts.get("preset"), opts.get("checkpoint"))
    kwargs = call_settings(traj)
    entries = traj.prompts[:num_prompts] if num_prompts else list(traj.prompts)
    rows, students, teachers = [], [], []
    from PIL import Image

    with staging(out, force, "eval") as tmp:
        (tmp / "images").mkdir()
        bar = tqdm(entries, desc="eval", unit="prompt", disable=not progress, leave=False)
        for entry in bar:
            row, img, warn = evaluate_prompt(pipe, student, traj, entry, kwargs, tmp / "images")
            for w in warn:
                if w not in warnings:
                    warnings.append(w)
                    log(f"warning: {w}")
            if row["status"] == "failed":
                log(f"prompt {row['index']}: FAILED — {row['error']} at step {row['failed_step']}")
            else:
                students.append(img)
                with Image.open(traj.image_path(entry["index"])) as f:
                    teachers.append(im.image_tensor(f))
                bar.set_postfix_str(f"PSNR {im.fmt(row['psnr'])} dB")
            rows.append(row)
        bar.close()
        ok_rows = [r for r in rows if r["status"] == "ok"]
        extra, skipped, per_prompt = im.optional_metrics(
            {"fid_features": fid_features, "clip": clip, "lpips": lpips}, students, teachers,
            [r["prompt"] for r in ok_rows], log)
        for key, values in per_prompt.items():
            for r, v in zip(ok_rows, values):
                r[key] = v
        result = {
            "kind": KIND, "format": FORMAT, "fbqc": _version(),
            "target": student.description,
            "capture": {"dir": str(traj.dir), "model_file": model_file, "opts": opts,
                        "prompts": len(traj.prompts), "weights_sha256": traj.manifest.get("model", {}).get(
                            "weights_sha256")},
            "settings": {"call": kwargs, "num_prompts": len(entries), "fake_quant": fake_quant,
                         "fid_features": str(fid_features) if fid_features else None,
                         "clip": str(clip) if clip else None, "lpips": str(lpips) if lpips else None,
                         "diff_amplification": 4},
            "aggregate": {**_aggregate(rows), **extra},
            "skipped": skipped,
            "warnings": warnings,
            "prompts": rows,
            "seconds": time.perf_counter() - t0,
        }
        result = _jsonable(result)
        (tmp / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        from .eval_report import write_report

        write_report(tmp, result, traj)
    return {**result, "out": str(out)}


def _version() -> str:
    from . import __version__

    return __version__
