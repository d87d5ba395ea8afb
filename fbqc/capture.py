"""``fbqc capture``: run a model file's float ``pipeline()`` on prompts and record every transformer call.

The shape of deepcompressor's calibration collection and Qualcomm AI Hub's ``make_calib_data``: a
forward hook on ``pipe.transformer`` records, at every denoising step, the keyword arguments exactly as
the transformer received them and its output; a classifier-free-guidance batch (batch 2: the four seed
pipelines concatenate ``[uncond, cond]``) is split into ``uncond`` and ``cond`` records of batch 1; a
pipeline that calls the transformer once per branch (FLUX true CFG) is named by its ``cache_context``.
Each prompt's seed is a hash of (index, prompt). One prompt's records are held in memory, written as one
shard (:mod:`fbqc.trajectories`), then dropped. The directory layout is described there.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import trajectories as tj
from .errors import ModelFileError
from .frontend import load_model_file
from .outputs import write_replacing
from .recorder import png_bytes, run_prompt
from .trajectories import CaptureError

PIPELINE_HINT = ("define pipeline(**opts) -> diffusers.DiffusionPipeline whose .transformer is "
                 "model(**opts)")


# ---- prompts and seeds ---------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise CaptureError(f"prompt file {path} does not exist (give --prompts FILE, one prompt a line)")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise CaptureError(f"prompt file {path} holds no prompt (one prompt a line; # starts a comment)")
    return prompts


def prompt_seed(index: int, prompt: str, offset: int = 0) -> int:
    """A stable 63-bit seed from (index, prompt): sha256, first 8 bytes, top bit dropped; plus ``offset``."""
    h = int.from_bytes(hashlib.sha256(f"{index}\n{prompt}".encode()).digest()[:8], "big") >> 1
    return (h + offset) % (1 << 63)


def default_prompts(model_file: str | Path) -> Path:
    """``prompts/calib.txt`` next to the model file (the examples ship one); else --prompts is needed."""
    path = Path(model_file).resolve().parent / "prompts" / "calib.txt"
    if not path.is_file():
        raise CaptureError(f"no --prompts given and no prompts/calib.txt next to {model_file}; "
                           f"pass --prompts FILE (one prompt a line)")
    return path


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state_dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- generation settings -------------------------------------------------------------------------


def parse_resolution(value: str | int | tuple | None) -> tuple[int, int] | None:
    if value is None or isinstance(value, tuple):
        return value
    text = str(value).lower().replace("×", "x")
    try:
        h, w = (text.split("x") + [text])[:2] if "x" in text else (text, text)
        h, w = int(h), int(w)
    except ValueError:
        raise CaptureError(f"--resolution {value!r}: expected HxW (e.g. 512x512) or N") from None
    if h <= 0 or w <= 0:
        raise CaptureError(f"--resolution {value!r}: height and width must be positive")
    return h, w


def generation_kwargs(pipe, defaults: dict[str, Any], steps: int | None, guidance: float | None,
                      resolution: tuple[int, int] | None) -> dict[str, Any]:
    """The pipeline call's settings: the model file's ``generation_defaults()`` (keys the pipeline
    takes) under the user's overrides; what neither sets stays the pipeline's own default."""
    accepted = inspect.signature(pipe.__call__).parameters
    kw = {k: v for k, v in defaults.items() if k in accepted}
    for key, value in (("num_inference_steps", steps), ("guidance_scale", guidance)):
        if value is not None:
            kw[key] = value
    if resolution is not None:
        kw["height"], kw["width"] = resolution
    for key in ("num_inference_steps", "guidance_scale", "height", "width"):
        if key not in kw and key in accepted and accepted[key].default is not inspect.Parameter.empty:
            kw[key] = accepted[key].default
    kw.update(num_images_per_prompt=1, output_type="pil")
    return kw


# ---- the capture directory -----------------------------------------------------------------------


def _ours(path: Path) -> bool:
    """Files fbqc capture creates (the only ones --force removes)."""
    rel = path.name
    if path.parent.name == tj.SHARDS:
        return (rel[:5].isdigit() and rel.endswith((".safetensors", ".json"))) or rel.endswith(".tmp")
    if path.parent.name == tj.IMAGES:
        return (rel[:5].isdigit() and rel.endswith(".png")) or rel.endswith(".tmp")
    return rel in (tj.MANIFEST, f".{tj.MANIFEST}.tmp")


def check_output(out: Path) -> str:
    """"new", "capture" (an fbqc capture is there) — or refuse a file or a foreign directory."""
    if out.exists() and not out.is_dir():
        raise CaptureError(f"{out} is a file, not a capture directory; choose another -o")
    if not out.exists():
        return "new"
    if tj.read_manifest(out) is not None:
        return "capture"
    if any(out.iterdir()):
        raise CaptureError(f"{out} is not an fbqc capture; choose another -o")
    return "new"


def remove_capture(out: Path) -> None:
    """Delete what a capture wrote in ``out`` (manifest, shards, images); leave anything else."""
    for sub in (tj.SHARDS, tj.IMAGES):
        if (out / sub).is_dir():
            for p in (out / sub).iterdir():
                if p.is_file() and _ours(p):
                    p.unlink()
            with contextlib.suppress(OSError):
                (out / sub).rmdir()
    for name in (tj.MANIFEST, f".{tj.MANIFEST}.tmp"):
        (out / name).unlink(missing_ok=True)


@contextlib.contextmanager
def locked(out: Path):
    """One writer at a time (the same lock as every fbqc output directory: :func:`fbqc.outputs.output_lock`)."""
    from .outputs import output_lock

    with output_lock(out):
        out.mkdir(parents=True, exist_ok=True)
        yield


def fingerprint(manifest: dict[str, Any]) -> dict[str, Any]:
    """What must match for a rerun to continue a capture: weights, pipeline, scheduler, call settings."""
    m = manifest.get("model", {})
    return {"transformer": m.get("transformer"), "weights_sha256": m.get("weights_sha256"),
            "pipeline": manifest.get("pipeline"), "scheduler": manifest.get("scheduler"),
            "call": manifest.get("call", {}).get("kwargs"), "seed_offset": manifest.get("seed_offset")}


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted({*old, *new}, key=str) for d in _diff(old.get(k), new.get(k), f"{path}.{k}")]
    return [] if old == new else [f"{path.lstrip('.')}: {str(old)[:40]} -> {str(new)[:40]}"]


def compare(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    diff = _diff(old, new)
    if diff:
        raise CaptureError(f"{out} holds a capture made with other settings ({'; '.join(diff[:3])}); pass "
                           f"another -o, or --force to replace it")


def load_pipeline(model_file: str | Path, preset: str | None, checkpoint: str | Path | None):
    """(ModelFile, pipeline with its progress bar off, generation defaults)."""
    mf = load_model_file(model_file, preset=preset, checkpoint=checkpoint)
    if not mf.has("pipeline"):
        raise ModelFileError(f"{mf.path}: defines no pipeline(); fbqc capture needs one: {PIPELINE_HINT}")
    pipe = mf.call("pipeline")
    if not callable(pipe) or not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise ModelFileError(f"{mf.path}: pipeline() returned {type(pipe).__name__} without a .transformer "
                             f"module; {PIPELINE_HINT}")
    if getattr(pipe, "vae", None) is None:
        raise ModelFileError(f"{mf.path}: pipeline() has no .vae; fbqc capture records the final latents "
                             f"the VAE decodes")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    defaults = mf.call("generation_defaults") if mf.has("generation_defaults") else {}
    return mf, pipe, dict(defaults or {})


def _json(x: Any) -> Any:
    import json
    return json.loads(json.dumps(x, default=str))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- the command ---------------------------------------------------------------------------------


def capture(model_file: str | Path, prompts: str | Path | None = None, out: str | Path | None = None, *,
            preset: str | None = None, checkpoint: str | Path | None = None, num_prompts: int | None = None,
            steps: int | None = None, guidance: float | None = None, resolution=None, seed_offset: int = 0,
            dry_run: bool = False, force: bool = False, progress: bool = False,
            log: Callable[[str], None] | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Capture the teacher's trajectories of ``prompts`` into ``out``; returns the summary.

    Resumes an fbqc capture already in ``out`` made with the same model and settings (``force``
    replaces it instead). ``dry_run`` runs one prompt at (at most) 2 steps and returns the estimated
    bytes and time, writing nothing. ``stop_after`` (tests) returns after that many new prompts.
    """
    from tqdm.auto import tqdm

    log = log or (lambda s: None)
    t_start = time.perf_counter()
    prompts_path = Path(prompts) if prompts is not None else default_prompts(model_file)
    texts = read_prompts(prompts_path)
    if num_prompts is not None and num_prompts < 1:
        raise CaptureError(f"--num-prompts {num_prompts}: must be at least 1")
    n = len(texts) if num_prompts is None else min(num_prompts, len(texts))
    texts = texts[:n]
    resolution = parse_resolution(resolution)
    if not dry_run:
        if out is None:
            raise CaptureError("no output directory: pass -o DIR")
        out = Path(out)
        state = check_output(out)
    mf, pipe, defaults = load_pipeline(model_file, preset, checkpoint)
    kwargs = generation_kwargs(pipe, defaults, steps, guidance, resolution)
    if dry_run:
        return estimate(pipe, texts, kwargs, seed_offset)
    tr = pipe.transformer
    import diffusers

    from . import __version__
    prior = tj.read_manifest(out) if state == "capture" else None
    manifest = {
        "fbqc": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "model": {"file": str(mf.path), "file_resolved": str(mf.path.resolve()),
                  "opts": {k: str(v) for k, v in mf.opts.items()},
                  "transformer": f"{type(tr).__module__}.{type(tr).__name__}",
                  "weights_sha256": weights_sha256(tr), "parameters": sum(p.numel() for p in tr.parameters())},
        "pipeline": f"{type(pipe).__module__}.{type(pipe).__name__}",
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": _json(
            {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")})},
        "steps": kwargs.get("num_inference_steps"), "guidance": kwargs.get("guidance_scale"),
        "resolution": [kwargs["height"], kwargs["width"]] if "height" in kwargs and "width" in kwargs else None,
        "seed_offset": seed_offset,
        "call": {"kwargs": _json(kwargs), "static": None},
        "branches": None,
        "prompts_file": {"path": str(prompts_path), "sha256": file_sha256(prompts_path)},
        "requested": n,
    }
    if prior is not None and not force:
        compare(fingerprint(prior), fingerprint(manifest), out)
        for key in ("resolution", "branches"):
            manifest[key] = manifest[key] or prior.get(key)
        manifest["call"]["static"] = prior.get("call", {}).get("static")
    with locked(out):
        if prior is not None and force:
            remove_capture(out)
            prior = None
        for sub in (tj.SHARDS, tj.IMAGES):
            for p in (out / sub).glob(".*.tmp") if (out / sub).is_dir() else ():
                p.unlink()                             # torn writes of an interrupted run
        finished = {i: e for i, e in tj.finished_prompts(out).items()
                    if (out / e.get("image", "")).is_file()} if prior is not None else {}
        for i, e in finished.items():
            if i < n and e["prompt"] != texts[i]:
                raise CaptureError(f"{out} holds prompt {i} {e['prompt'][:40]!r}, {prompts_path} has "
                                   f"{texts[i][:40]!r} there; pass another -o, or --force to replace it")

        def save(timings: dict) -> None:
            entries = [finished[i] for i in sorted(finished)]
            size = sum((out / e["shard"]).stat().st_size + (out / e["image"]).stat().st_size for e in entries)
            manifest.update(prompts=entries, complete=all(i in finished for i in range(n)),
                            records=sum(e["steps"] * len(e["branches"]) for e in entries), bytes=size,
                            timings=timings)
            tj.write_manifest(out, manifest)

        todo = [i for i in range(n) if i not in finished]
        if prior is not None and not todo and prior.get("prompts"):
            return summary(prior, out, status="complete")     # nothing to do: the manifest stays as it is
        seconds, calls = [], []
        timings = lambda: {"seconds": round(time.perf_counter() - t_start, 3), "prompts_this_run": len(seconds),  # noqa: E731
                           "seconds_per_prompt": round(sum(seconds) / len(seconds), 4) if seconds else None,
                           "seconds_per_transformer_call": round(sum(calls) / len(calls), 5) if calls else None}
        save(timings())
        if finished and todo:
            log(f"resuming {out}: {len(finished)} of {n} prompts done, continuing at prompt {todo[0]}")
        bar = tqdm(total=n, initial=n - len(todo), desc="capture", unit="prompt", disable=not progress,
                   dynamic_ncols=True)
        (out / tj.IMAGES).mkdir(exist_ok=True)
        for i in todo:
            seed = prompt_seed(i, texts[i], seed_offset)
            rec, image, secs = run_prompt(pipe, i, texts[i], seed, kwargs)
            if image is None:
                raise CaptureError(f"prompt {i}: the pipeline returned no image (output_type='pil')")
            static = _json(rec.static or {})
            if manifest["call"]["static"] is None:
                manifest["call"]["static"] = static
            elif static != manifest["call"]["static"]:
                raise CaptureError(f"prompt {i}: the transformer's non-tensor arguments {static} differ from "
                                   f"the capture's {manifest['call']['static']}; pass another -o or --force")
            name = tj.shard_name(i)
            img = out / tj.IMAGES / f"{name}.png"
            write_replacing(img, lambda tmp: tmp.write_bytes(png_bytes(image)))
            entry = {"prompt": texts[i], "seed": seed, "image": f"{tj.IMAGES}/{name}.png",
                     "resolution": [image.height, image.width]}
            finished[i] = tj.write_prompt(out, i, entry, rec.steps, rec.final)
            manifest["branches"] = manifest["branches"] or finished[i]["branches"]
            manifest["resolution"] = manifest["resolution"] or entry["resolution"]
            seconds.append(secs)
            calls += rec.call_seconds
            del rec
            save(timings())
            bar.update(1)
            if stop_after is not None and len(seconds) >= stop_after:
                break
        bar.close()
    return summary(manifest, out, status="captured" if seconds else "complete")


def summary(manifest: dict[str, Any], out: Path, status: str) -> dict[str, Any]:
    t = manifest["timings"]
    return {"status": status, "directory": str(out), "prompts": len(manifest["prompts"]),
            "requested": manifest["requested"], "complete": manifest["complete"], "records": manifest["records"],
            "steps": manifest["steps"], "branches": manifest["branches"], "bytes": manifest["bytes"],
            "seconds": t["seconds"], "prompts_this_run": t["prompts_this_run"],
            "seconds_per_prompt": t["seconds_per_prompt"],
            "seconds_per_transformer_call": t["seconds_per_transformer_call"]}


def estimate(pipe, texts: list[str], kwargs: dict[str, Any], seed_offset: int) -> dict[str, Any]:
    """Run the first prompt at min(steps, 2) steps, writing nothing, and extrapolate bytes and time."""
    from safetensors.torch import save as st_save

    steps = int(kwargs.get("num_inference_steps") or 2)
    probe = min(steps, 2)
    rec, image, secs = run_prompt(pipe, 0, texts[0], prompt_seed(0, texts[0], seed_offset),
                                  {**kwargs, "num_inference_steps": probe})
    tensors, fields = tj.shard_tensors(0, rec.steps, rec.final)
    nbytes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    fixed = sum(b for k, b in nbytes.items() if k.count("/") != 2)         # per prompt: text, final latents
    per_step = sum(b for k, b in nbytes.items() if "/0000/" in k)
    header = (len(st_save(tensors)) - sum(nbytes.values())) / max(len(tensors), 1)
    keys = len(tensors) + (steps - probe) * sum("/0000/" in k for k in tensors)
    png = len(png_bytes(image)) if image is not None else 0
    per_prompt = int(fixed + steps * per_step + header * keys) + png
    warm = rec.call_seconds[1:] or rec.call_seconds              # the first call pays one-time warm-up
    call = sum(warm) / len(warm)
    est = (secs - sum(rec.call_seconds)) + steps * call * len(rec.call_seconds) / probe
    n = len(texts)
    return {"status": "dry-run", "prompts": n, "steps": steps, "probe_steps": probe,
            "branches": fields["branches"], "records_per_prompt": steps * len(fields["branches"]),
            "records": n * steps * len(fields["branches"]), "per_prompt_keys": fields["per_prompt"],
            "bytes_per_prompt": per_prompt, "bytes_per_step": per_step, "bytes_once_per_prompt": fixed,
            "image_bytes": png, "bytes_total": per_prompt * n, "transformer_calls_per_step": len(rec.call_seconds) // probe,
            "seconds_per_transformer_call": round(call, 4), "seconds_per_prompt": round(est, 3),
            "seconds_total": round(est * n, 1), "call": _json(kwargs)}
