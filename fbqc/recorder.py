"""Recording one pipeline call: hooks on ``pipe.transformer`` and ``pipe.vae.decode`` (``fbqc capture``).

:class:`Recorder` binds each transformer call's positional arguments to their names
(``inspect.signature``), keeps the arguments exactly as received (dtypes too) and the output, splits a
classifier-free-guidance batch of 2 into ``uncond`` (index 0) and ``cond`` (index 1) — Sana, PixArt-Σ and
SD3 concatenate ``[negative, positive]`` — and names the separate calls of a pipeline that runs each
branch on its own (FLUX true CFG) by the ``cache_context`` the pipeline opens. A new step starts when a
branch repeats. Tensors whose leading dim is the CFG batch are split; the others (FLUX's 2-D
``img_ids``/``txt_ids``) are kept whole.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import time
from typing import Any, Callable

import torch

from . import trajectories as tj
from .trajectories import CaptureError


def _first_tensor(output: Any) -> torch.Tensor:
    out = getattr(output, "sample", output)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise CaptureError(f"the transformer returned {type(output).__name__}; expected a tensor, a tuple "
                           f"starting with one, or an object with .sample")
    return out


class Recorder:
    """Hooks on ``pipe.transformer`` (every call) and ``pipe.vae.decode`` (the final latents) while a
    ``with`` block runs; ``steps`` ends up as ``[{branch: {"inputs": {...}, "output": t}}, ...]``."""

    def __init__(self, pipe, where: Callable[[int], str] = lambda s: f"step {s}") -> None:
        self.pipe, self.where = pipe, where
        self.transformer = pipe.transformer
        self.sig = inspect.signature(self.transformer.forward)
        self.steps: list[dict[str, dict[str, Any]]] = []
        self.static: dict[str, Any] | None = None
        self.final: torch.Tensor | None = None
        self.context: str | None = None
        self.call_seconds: list[float] = []

    def _bind(self, args, kwargs) -> dict[str, Any]:
        bound = self.sig.bind(*args, **kwargs).arguments
        out = {}
        for name, v in bound.items():
            kind = self.sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                out.update(v)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if v:
                    raise CaptureError(f"the transformer got extra positional arguments (*{name}); "
                                       f"fbqc capture records named arguments only")
            else:
                out[name] = v
        return out

    def _pre(self, module, args, kwargs):
        self._t0 = time.perf_counter()

    def _hook(self, module, args, kwargs, output):
        self.call_seconds.append(time.perf_counter() - self._t0)
        tensors, static = tj.flatten_kwargs(self._bind(args, kwargs))
        if self.static is None:
            self.static = static
        elif static != self.static:
            diff = sorted(k for k in {*static, *self.static} if static.get(k) != self.static.get(k))
            raise CaptureError(f"{self.where(len(self.steps))}: non-tensor transformer argument(s) "
                               f"{diff} changed between calls; fbqc capture stores them once")
        out = _first_tensor(output).detach()
        batch = out.shape[0]
        if batch == 2:      # CFG batch: the pipelines concatenate [negative, positive] on dim 0
            halves = {"uncond": slice(0, 1), "cond": slice(1, 2)}
        elif batch == 1:
            halves = {self.context or "cond": slice(0, 1)}
        else:
            raise CaptureError(f"{self.where(len(self.steps))}: transformer batch {batch}; fbqc capture "
                               f"runs one image per prompt (batch 1, or 2 with classifier-free guidance)")
        if not self.steps or any(b in self.steps[-1] for b in halves):
            self.steps.append({})
        step = len(self.steps) - 1
        if out.is_floating_point() and not bool(torch.isfinite(out).all()):
            raise CaptureError(f"{self.where(step)}: the teacher transformer's output contains NaN or Inf "
                               f"(check the weights / --checkpoint and the generation settings)")
        for branch, sl in halves.items():
            inputs = {k: (v[sl] if batch == 2 and v.dim() >= 1 and v.shape[0] == batch else v)
                      .detach().clone() for k, v in tensors.items()}
            self.steps[step][branch] = {"inputs": inputs, "output": out[sl].clone()}

    def __enter__(self) -> Recorder:
        t, vae = self.transformer, self.pipe.vae
        self.handles = [t.register_forward_pre_hook(self._pre, with_kwargs=True),
                        t.register_forward_hook(self._hook, with_kwargs=True)]
        decode = vae.decode

        def recording_decode(z, *a, **k):
            if self.final is None:
                self.final = z.detach().clone()
            return decode(z, *a, **k)
        vae.decode = recording_decode
        if callable(getattr(t, "cache_context", None)):     # diffusers names separate branch calls
            original, rec = t.cache_context, self

            @contextlib.contextmanager
            def cache_context(name, *a, **k):
                rec.context = name
                try:
                    with original(name, *a, **k):
                        yield
                finally:
                    rec.context = None
            t.cache_context = cache_context
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for obj, name in ((self.pipe.vae, "decode"), (self.transformer, "cache_context")):
            if name in vars(obj):
                delattr(obj, name)


def generate(pipe, prompt: str, seed: int, kwargs: dict[str, Any]):
    """The pipeline's first image (PIL, or None) for ``prompt``, its initial noise from a CPU generator
    seeded with ``seed``: the one call that capture (the teacher) and eval (a student) both make."""
    result = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    images = getattr(result, "images", None) or (result[0] if isinstance(result, tuple) else None)
    return images[0] if images else None


def run_prompt(pipe, index: int, prompt: str, seed: int, kwargs: dict[str, Any]):
    """(Recorder, PIL image, seconds) of one pipeline call."""
    where = lambda s: f"prompt {index} ({prompt[:40]!r}) step {s}"  # noqa: E731
    t0 = time.perf_counter()
    with Recorder(pipe, where) as rec, torch.no_grad():
        image = generate(pipe, prompt, seed, kwargs)
    if rec.final is not None and rec.final.is_floating_point() and not bool(torch.isfinite(rec.final).all()):
        raise CaptureError(f"prompt {index} ({prompt[:40]!r}): the final latents contain NaN or Inf")
    return rec, image, time.perf_counter() - t0


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
