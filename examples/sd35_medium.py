"""Stable Diffusion 3.5 Medium (MMDiT-X): ``diffusers.SD3Transformer2DModel``.

Architecture: patch-2 embedding of a 16-channel SD3-VAE latent with a cropped 2-D sin-cos positional
embedding (``pos_embed_max_size`` 384), timestep + pooled CLIP-L/G text embedding (2048) conditioning, joint
(MMDiT) blocks: image and text streams with their own adaLN-Zero modulation, QKV/out projections and GELU(tanh)
MLPs, attending jointly; RMS q/k norm (``qk_norm="rms_norm"``); the first 13 blocks add a second image-only
self-attention (``dual_attention_layers``, MMDiT-X); the last block updates only the image stream.
Flow-matching model: timesteps are floats in [0, 1000) (sigma * 1000).

Presets (random but deterministic fp32 weights; ``checkpoint=DIR`` loads a local diffusers checkpoint):

=========  ===================================================  ==================  ====================  =============
preset     config                                               latent (res.)       tokens img + text     parameters
=========  ===================================================  ==================  ====================  =============
tiny       2 joint blocks (block 0 dual-attention), 2 x 16 = 32  16x16x16 (128 px)   64 + 8 (x 64 ch)      89,344
full       configs/sd35_medium.json, 24 blocks, 24 x 64 = 1536  64x64x16 (512 px)   1024 + 333 (x 4096)   2,243,171,520
full-meta  as full, weights on the meta device (no memory)      64x64x16 (512 px)   1024 + 333 (x 4096)   2,243,171,520
=========  ===================================================  ==================  ====================  =============

``full`` holds ~9 GB of fp32 weights (fits in 24 GiB); ``full-meta`` builds the same module under
``torch.device("meta")`` for export/graph work; its ``example_inputs`` are meta tensors too (meta weights
export only with meta inputs), its ``calibration_data`` real CPU tensors of the same shapes. Text: 333 tokens =
77 CLIP + 256 T5. With a checkpoint the preset only has to be valid; the input resolution follows the
checkpoint's size (hidden size <= 256: the tiny resolution, else the full one). Inputs: ``hidden_states``
(1, 16, H, W), ``encoder_hidden_states`` (1, T, 4096), ``pooled_projections`` (1, 2048), ``timestep`` (1,)
float32.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel as Cls

CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = {"tiny": "sd35_medium.json", "full": "sd35_medium.json", "full-meta": "sd35_medium.json"}
TINY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "caption_projection_dim": 32,
        "joint_attention_dim": 64, "pooled_projection_dim": 32, "sample_size": 16, "pos_embed_max_size": 16,
        "dual_attention_layers": [0]}
META_PRESETS = {"full-meta"}            # built under torch.device("meta")
RESOLUTION = {"tiny": {"latent": 16, "text": 8}, "full": {"latent": 64, "text": 333}}
FULL_PARAMS = 2_243_171_520
TINY_PARAMS = 89_344


def _checkpoint_config(checkpoint) -> Path:
    d = Path(checkpoint).expanduser()
    if not d.is_dir():
        why = "is not a directory" if d.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint directory {d} {why}")
    for path in (d / "transformer" / "config.json", d / "config.json"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"checkpoint {d} has neither transformer/config.json nor config.json")


def _config(preset: str, checkpoint=None) -> tuple[dict, str]:
    """(constructor config, resolution key) for a preset or a checkpoint."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for {Path(__file__).name}; "
                         f"valid presets: {', '.join(PRESETS)}")
    if checkpoint is not None:
        raw = json.loads(_checkpoint_config(checkpoint).read_text())
        if raw.get("_class_name", Cls.__name__) != Cls.__name__:
            raise ValueError(f"checkpoint {checkpoint} holds a {raw['_class_name']}, this file builds {Cls.__name__}")
        defaults = {k: p.default for k, p in inspect.signature(Cls.__init__).parameters.items()
                    if p.default is not p.empty}
        cfg = {**defaults, **{k: v for k, v in raw.items() if not k.startswith("_")}}
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return cfg, ("tiny" if inner <= 256 else "full")
    cfg = json.loads((CONFIGS / PRESETS[preset]).read_text())
    if preset == "tiny":
        cfg.update(TINY)
    return cfg, ("tiny" if preset == "tiny" else "full")


def _reinit_zero_params(m: torch.nn.Module, std: float = 0.02) -> None:
    """Random presets: an all-zero parameter (zero-init adaLN/output layers) would make the output trivial."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if not p.is_meta and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def model(preset: str = "tiny", checkpoint=None) -> torch.nn.Module:
    """The transformer in eval mode, fp32: random deterministic weights, or ``checkpoint``'s weights."""
    cfg, _ = _config(preset, checkpoint)
    if checkpoint is not None:
        d = Path(checkpoint).expanduser()
        sub = {"subfolder": "transformer"} if (d / "transformer" / "config.json").is_file() else {}
        sub["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None   # no warning without it
        return Cls.from_pretrained(str(d), local_files_only=True, torch_dtype=torch.float32, **sub).eval()
    if preset in META_PRESETS:
        with torch.device("meta"):
            return Cls(**cfg).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = Cls(**cfg)
    _reinit_zero_params(m)
    return m.eval()                      # built in fp32 (the default dtype)


def _clean_latent(c: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A structured "image" latent: smooth low-frequency field + fine detail (unit std), per-channel offset."""
    low = torch.randn(1, c, max(h // 4, 1), max(w // 4, 1), generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(1, c, h, w, generator=g)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x / x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6) + 0.2 * torch.randn(1, c, 1, 1, generator=g)


def _sample(cfg: dict, res: str, g: torch.Generator) -> dict:
    side, text = RESOLUTION[res]["latent"], RESOLUTION[res]["text"]
    c = cfg["in_channels"]
    t = torch.rand(1, generator=g) * 1000.0                   # flow matching: t in [0, 1000)
    sigma = t / 1000.0
    noise = torch.randn(1, c, side, side, generator=g)
    latents = (1.0 - sigma) * _clean_latent(c, side, side, g) + sigma * noise
    return {
        "hidden_states": latents.contiguous(),
        "encoder_hidden_states": torch.randn(1, text, cfg["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        "timestep": t.to(torch.float32),
    }


def _stream(cfg: dict, res: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield _sample(cfg, res, g)


def example_inputs(preset: str = "tiny", checkpoint=None) -> dict:
    """Keyword arguments of ``forward`` (batch 1, deterministic); the caller adds ``return_dict=False``.

    For a meta-device preset the tensors are moved to ``meta`` too: meta weights export only with meta inputs.
    """
    inputs = next(_stream(*_config(preset, checkpoint), seed=1234))
    if checkpoint is None and preset in META_PRESETS:
        inputs = {k: v.to("meta") for k, v in inputs.items()}
    return inputs


def calibration_data(preset: str = "tiny", checkpoint=None):
    """Endless deterministic stream of denoiser inputs: noised structured latents, uniform t, N(0,1) text + pooled."""
    return _stream(*_config(preset, checkpoint), seed=0)


def training_data(preset: str = "tiny", checkpoint=None):
    return _stream(*_config(preset, checkpoint), seed=1)
