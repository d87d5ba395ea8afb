"""Shared plumbing of the example model files (``sana.py``, ``pixart_sigma.py``, ``sd35_medium.py``, ...).

Each example wraps one ``diffusers`` transformer class the same way; this module holds the parts that do not
depend on the architecture, so a model file only states what does (its presets, its tiny overrides, how one
input sample looks):

- **config**: ``resolve_config`` turns a preset name (a JSON file in ``configs/``, the ``"tiny"`` preset
  shrunk by the file's ``TINY`` overrides) or a local diffusers checkpoint (``checkpoint_config`` finds its
  ``config.json``) into the constructor config plus a resolution key, ``"tiny"`` or ``"full"``.
- **weights**: ``build_model`` loads the checkpoint's weights, or builds random but deterministic fp32 weights
  (torch seed 0, then ``reinit_zero_params``), or builds the module on the meta device (no memory): for a
  meta preset, or whenever it is called under ``torch.device("meta")`` (checkpoint or not).
- **inputs**: ``samples`` is an endless deterministic stream of a file's ``_sample(cfg, res, generator)``;
  ``noised_latent`` mixes noise into ``clean_latent``, a structured "image" latent; ``on_meta`` moves a sample
  to the meta device.

A model file imports it as ``from _common import ...``: ``fbqc`` puts the model file's folder on ``sys.path``
before importing the file, as ``python model.py`` does.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fbqc.data import SeededSamples

CONFIGS = Path(__file__).resolve().parent / "configs"

# ---- config ----------------------------------------------------------------------------------------


def checkpoint_config(checkpoint) -> Path:
    """The ``config.json`` of a local diffusers checkpoint: ``DIR/transformer/config.json`` or ``DIR/config.json``."""
    d = Path(checkpoint).expanduser()
    if not d.is_dir():
        why = "is not a directory" if d.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint directory {d} {why}")
    for path in (d / "transformer" / "config.json", d / "config.json"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"checkpoint {d} has neither transformer/config.json nor config.json")


def resolve_config(cls: type, preset: str, checkpoint, *, presets: dict[str, str], tiny: dict,
                   model_file: str) -> tuple[dict, str]:
    """(constructor config of ``cls``, resolution key "tiny" | "full") for a preset or a checkpoint.

    ``presets`` maps a preset name to its JSON file in ``configs/``; ``tiny`` overrides that config for the
    ``"tiny"`` preset; ``model_file`` (the caller's ``__file__``) names the file in errors. With a checkpoint the
    preset only has to be valid: the config is the checkpoint's (over ``cls``'s defaults), and the resolution
    follows its size (attention inner dim <= 256: tiny, else full).
    """
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {Path(model_file).name}; "
                         f"valid presets: {', '.join(presets)}")
    if checkpoint is not None:
        raw = json.loads(checkpoint_config(checkpoint).read_text())
        if raw.get("_class_name", cls.__name__) != cls.__name__:
            raise ValueError(f"checkpoint {checkpoint} holds a {raw['_class_name']}, this file builds {cls.__name__}")
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not p.empty}
        cfg = {**defaults, **{k: v for k, v in raw.items() if not k.startswith("_")}}
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return cfg, ("tiny" if inner <= 256 else "full")
    cfg = json.loads((CONFIGS / presets[preset]).read_text())
    if preset == "tiny":
        cfg.update(tiny)
    return cfg, ("tiny" if preset == "tiny" else "full")


# ---- weights ---------------------------------------------------------------------------------------


def reinit_zero_params(m: torch.nn.Module, std: float = 0.02) -> None:
    """Random presets: an all-zero parameter (zero-init adaLN/output layers) would make the output trivial."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if not p.is_meta and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_model(cls: type, cfg: dict, checkpoint=None, *, meta: bool = False) -> torch.nn.Module:
    """``cls`` in eval mode, fp32: ``checkpoint``'s weights, else (``meta``) meta weights, else random ones.

    Random weights are deterministic (torch seed 0 inside a forked RNG, so the caller's RNG is untouched) and
    have no all-zero parameter. A checkpoint may hold the transformer in ``DIR/transformer`` or in ``DIR``.
    Called under ``torch.device("meta")`` (``fbqc train --nproc N`` builds every rank but 0 so: their weights
    come from rank 0), the module is built from the config on meta and no checkpoint is read.
    """
    if torch.get_default_device().type == "meta":
        with torch.device("meta"):
            return (cls.from_config(cfg) if checkpoint is not None else cls(**cfg)).eval()
    if checkpoint is not None:
        d = Path(checkpoint).expanduser()
        sub = {"subfolder": "transformer"} if (d / "transformer" / "config.json").is_file() else {}
        sub["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None   # no warning without it
        return cls.from_pretrained(str(d), local_files_only=True, torch_dtype=torch.float32, **sub).eval()
    if meta:
        with torch.device("meta"):
            return cls(**cfg).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = cls(**cfg)
    reinit_zero_params(m)
    return m.eval()                      # built in fp32 (the default dtype)


# ---- inputs ----------------------------------------------------------------------------------------


def clean_latent(c: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A structured "image" latent: smooth low-frequency field + fine detail (unit std), per-channel offset."""
    low = torch.randn(1, c, max(h // 4, 1), max(w // 4, 1), generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(1, c, h, w, generator=g)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x / x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6) + 0.2 * torch.randn(1, c, 1, 1, generator=g)


def noised_latent(c: int, side: int, signal, noise_std, g: torch.Generator) -> torch.Tensor:
    """``signal * clean_latent + noise_std * N(0, 1)`` of shape (1, c, side, side); the noise is drawn first."""
    noise = torch.randn(1, c, side, side, generator=g)
    return signal * clean_latent(c, side, side, g) + noise_std * noise


def samples(sample: Callable[[dict, str, torch.Generator], dict], cfg: dict, res: str, seed: int) -> SeededSamples:
    """Endless deterministic stream of ``sample(cfg, res, g)`` for ``seed`` (same seed, same stream):
    sample ``i`` has its own generator, so the stream is map-style (``s[i]``, ``len``) as well as
    iterable — each ``fbqc train --nproc N`` process makes only its own share of a batch."""
    return SeededSamples(functools.partial(sample, cfg, res), seed)


def on_meta(inputs: dict) -> dict:
    """The sample's tensors on the meta device, same shapes and dtypes: meta weights export only with meta inputs."""
    return {k: v.to("meta") for k, v in inputs.items()}
