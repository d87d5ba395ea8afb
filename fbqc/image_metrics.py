"""Image and latent metrics of ``fbqc eval`` (torchmetrics; never a download).

Always: paired PSNR and SSIM of the student's image vs the teacher's PNG
(``torchmetrics.functional.peak_signal_noise_ratio`` / ``structural_similarity_index_measure`` on
[0, 1] float images, ``data_range=1.0``), latent drift (MSE and cosine similarity).

With local weights only (a missing one is skipped with one line naming the flag):

* ``--fid-features PATH``: FID of the student images vs the teacher images with
  ``torchmetrics.image.fid.FrechetInceptionDistance(feature=<module>)``. PATH is a TorchScript module
  mapping **uint8 images (N, 3, H, W) with values 0–255** — what torchmetrics hands a custom feature
  network — to features (N, D). The standard FID Inception (``inception-2015-12-05.pt``, whose
  ``forward(img, return_features=False)`` resizes to 299 itself) qualifies; fbqc passes
  ``return_features=True`` when the module's forward has that argument.
* ``--clip DIR``: CLIP score (torchmetrics' ``clip_score``: ``100 * cos(image_embeds, text_embeds)``) of the
  student's and the teacher's images with their prompts, DIR a local ``transformers`` CLIP directory
  (``CLIPModel`` + ``CLIPProcessor``, ``save_pretrained``). torchmetrics 1.9 accepts only its listed hub
  names as ``model_name_or_path`` (a local directory is a ValueError) and expects ``get_*_features`` to
  return tensors (transformers >= 5 returns a ``ModelOutput``), so fbqc loads the directory itself
  (``local_files_only``) and hands torchmetrics a callable with an adapter. Each image/prompt pair is
  scored on its own and clamped at 0, ``max(100 * cos, 0)`` as CLIPScore is defined (torchmetrics clamps
  only the batch mean; the same when every cosine is positive, as with real CLIP models); the aggregate
  is the mean over prompts, the per-prompt scores go into the prompt rows.
* ``--lpips PATH``: torchmetrics' LPIPS needs torchvision and downloads its backbone, so it is not
  usable offline here; PATH is a TorchScript module ``(img1, img2) -> distance`` on float images in
  [-1, 1] (N, 3, H, W), e.g. a scripted ``lpips.LPIPS(net="alex")``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

SKIP_HINT = {
    "fid": "FID skipped: give --fid-features PATH (a local TorchScript feature network, e.g. the FID "
           "Inception inception-2015-12-05.pt)",
    "clip": "CLIP score skipped: give --clip DIR (a local transformers CLIP model directory)",
    "lpips": "LPIPS skipped: give --lpips PATH (a TorchScript LPIPS module; torchmetrics' LPIPS needs "
             "torchvision and a download)",
}


class MetricError(UserError):
    pass


def image_tensor(img) -> torch.Tensor:
    """A PIL image or an (H, W, 3) uint8 array → (1, 3, H, W) uint8 tensor."""
    arr = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
    if arr.dtype != np.uint8:
        raise MetricError(f"expected a uint8 image, got {arr.dtype}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)


def as_float(img_u8: torch.Tensor) -> torch.Tensor:
    return img_u8.to(torch.float32) / 255.0


def psnr_ssim(student_u8: torch.Tensor, teacher_u8: torch.Tensor) -> tuple[float, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if student_u8.shape != teacher_u8.shape:
        raise MetricError(f"student image {tuple(student_u8.shape)} and teacher image "
                          f"{tuple(teacher_u8.shape)} differ in size")
    s, t = as_float(student_u8), as_float(teacher_u8)
    psnr = float(peak_signal_noise_ratio(s, t, data_range=1.0))
    ssim = float(structural_similarity_index_measure(s, t, data_range=1.0))
    return psnr, ssim


def drift(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """(MSE, cosine similarity) of two tensors, in float64."""
    a, b = student.detach().double().reshape(-1), teacher.detach().double().reshape(-1)
    if a.shape != b.shape:
        raise MetricError(f"latent shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    mse = float(((a - b) ** 2).mean())
    na, nb = float(a.norm()), float(b.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    return mse, cos


def json_float(x: float | None) -> float | str | None:
    """JSON has no infinity: +inf → "inf", NaN → None."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def fmt(x: float | str | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if x == "inf" or (isinstance(x, float) and math.isinf(x) and x > 0):
        return "∞"
    return f"{float(x):.{digits}f}"


def mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else None


# ---- optional metrics with user-given weights -----------------------------------------------------


class FeatureNet(torch.nn.Module):
    """A feature network (TorchScript, ``.pt2`` or any module: uint8 (N, 3, H, W) → (N, D)) as torchmetrics'
    FID ``feature``; ``probe`` (images of the evaluated size) fixes ``num_features`` (see the module doc)."""

    def __init__(self, scripted: torch.nn.Module, probe: torch.Tensor, what: str = "the --fid-features network"):
        super().__init__()
        self.net = scripted
        try:
            names = [a.name for a in scripted.forward.schema.arguments]
        except AttributeError:
            import inspect
            names = list(inspect.signature(scripted.forward).parameters)
        self.kw = {"return_features": True} if "return_features" in names else {}
        with torch.no_grad():
            f = self.forward(probe)
        if f.dim() != 2:
            raise MetricError(f"{what} returned shape {tuple(f.shape)} for "
                              f"{tuple(probe.shape)} images; it must return (N, D) features")
        self.num_features = int(f.shape[1])

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(imgs, **self.kw).float()


def _script(path: Path, flag: str) -> torch.nn.Module:
    """A TorchScript module (``torch.jit.save``) or a ``torch.export`` program (``.pt2``) at ``path``."""
    import warnings

    if not Path(path).is_file():
        raise MetricError(f"{flag} {path}: no such file")
    try:
        if Path(path).suffix == ".pt2":
            return torch.export.load(str(path)).module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)     # torch >= 2.10 deprecates TorchScript
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/ValueError for foreign files
        raise MetricError(f"{flag} {path}: not a TorchScript module or torch.export .pt2 ({type(e).__name__}); "
                          f"save one with torch.jit.save(torch.jit.script(net), PATH)") from e


def fid(path: Path, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> float:
    """FID (torchmetrics) of the student images (fake) vs the teacher images (real), uint8 inputs."""
    return fid_with(FeatureNet(_script(path, "--fid-features"), teachers[0]), students, teachers)


def fid_with(net: FeatureNet, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> float:
    """FID (torchmetrics) of uint8 student images (fake) vs teacher images (real) in ``net``'s features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=net, normalize=False)
    metric.update(torch.cat(teachers), real=True)
    metric.update(torch.cat(students), real=False)
    return float(metric.compute())


class _ClipFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as
    tensors, what torchmetrics' clip_score divides by their norm (transformers >= 5 returns a
    ``BaseModelOutputWithPooling`` with them in ``pooler_output``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _embeds(out) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        pooled = getattr(out, "pooler_output", None)
        if pooled is None and isinstance(out, (tuple, list)):
            pooled = out[1] if len(out) > 1 else out[0]
        if not isinstance(pooled, torch.Tensor):
            raise MetricError(f"--clip: the model's feature methods returned {type(out).__name__}, "
                              f"not embeddings")
        return pooled

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeds(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeds(self.model.get_text_features(*args, **kwargs))


def load_clip(directory: Path) -> tuple[torch.nn.Module, Any]:
    """(model with tensor feature methods, processor) from a local CLIP directory; never a download."""
    from transformers import CLIPModel, CLIPProcessor

    if not Path(directory).is_dir():
        raise MetricError(f"--clip {directory}: not a directory (a local transformers CLIP model)")
    try:
        model = CLIPModel.from_pretrained(str(directory), local_files_only=True).float().eval()
        processor = CLIPProcessor.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MetricError(f"--clip {directory}: not a transformers CLIP model directory with its processor "
                          f"(CLIPModel and CLIPProcessor .save_pretrained): {type(e).__name__}: {e}") from e
    return _ClipFeatures(model), processor


def clip_scores(directory: Path, images: dict[str, list[torch.Tensor]], prompts: list[str]) -> dict[str, list[float]]:
    """Per-prompt CLIP scores ``max(100 * cos, 0)`` of each image list in ``images`` ({name: [uint8 (1, 3, H,
    W)]}, one image per prompt) with ``prompts``, through torchmetrics' ``clip_score`` (the model loaded once)."""
    from torchmetrics.functional.multimodal import clip_score

    loaded = load_clip(directory)
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for name, imgs in images.items():
            if len(imgs) != len(prompts):
                raise MetricError(f"CLIP score: {len(imgs)} {name} images for {len(prompts)} prompts")
            out[name] = [float(clip_score(img[0], prompt, model_name_or_path=lambda: loaded))
                         for img, prompt in zip(imgs, prompts)]
    return out


def lpips(path: Path, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[float]:
    net = _script(path, "--lpips")
    out = []
    with torch.no_grad():
        for s, t in zip(students, teachers):
            d = torch.as_tensor(net(as_float(s) * 2 - 1, as_float(t) * 2 - 1))
            if d.numel() != 1:                   # one pair in: one distance out (lpips.LPIPS: (1, 1, 1, 1))
                raise MetricError(f"the --lpips module returned shape {tuple(d.shape)} for one image pair; "
                                  f"it must return one distance per pair (N,) or (N, 1, 1, 1)")
            out.append(float(d.reshape(())))
    return out


def optional_metrics(opts: dict[str, Any], students: list[torch.Tensor], teachers: list[torch.Tensor],
                     prompts: list[str], log) -> tuple[dict[str, Any], dict[str, str], dict[str, list[float]]]:
    """(aggregates, skipped {metric: reason}, per-prompt values {row key: one value per image}).

    The per-prompt keys: ``lpips``, ``clip_score_student``, ``clip_score_teacher`` (those computed)."""
    agg: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    per: dict[str, list[float]] = {}
    if opts.get("fid_features"):
        if len(students) < 2:
            skipped["fid"] = f"FID skipped: it needs at least 2 images, {len(students)} evaluated"
        else:
            agg["fid"] = fid(Path(opts["fid_features"]), students, teachers)
    else:
        skipped["fid"] = SKIP_HINT["fid"]
    if opts.get("clip"):
        if students:
            scores = clip_scores(Path(opts["clip"]), {"student": students, "teacher": teachers}, prompts)
            for name, xs in scores.items():
                per[f"clip_score_{name}"] = xs
                agg[f"clip_score_{name}"] = mean(xs)
        else:
            agg["clip_score_student"] = agg["clip_score_teacher"] = None
    else:
        skipped["clip"] = SKIP_HINT["clip"]
    if opts.get("lpips"):
        per["lpips"] = lpips(Path(opts["lpips"]), students, teachers)
        agg["lpips"] = mean(per["lpips"])
    else:
        skipped["lpips"] = SKIP_HINT["lpips"]
    for reason in skipped.values():
        log(reason)
    return agg, skipped, per
