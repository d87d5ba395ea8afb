"""Sana (NVIDIA, arXiv 2410.10629): ``diffusers.SanaTransformer2DModel``, a DiT with linear attention.

Architecture: patch-1 embedding of a DC-AE latent (32 channels, 32x downsampling), adaLN-single timestep
modulation, per block: ReLU *linear* self-attention (``SanaLinearAttnProcessor2_0``), softmax cross-attention
to the (Gemma-2) caption embedding, and a Mix-FFN ``GLUMBConv`` (1x1 conv -> SiLU -> 3x3 depthwise conv ->
GLU gate -> 1x1 conv). No positional embedding. Flow-matching model: timesteps are floats in [0, 1000).

Presets (random but deterministic fp32 weights; ``checkpoint=DIR`` loads a local diffusers checkpoint):

=========  ===================================  =========================  ==================  =============
preset     config                               latent (resolution)        tokens img + text   parameters
=========  ===================================  =========================  ==================  =============
tiny       2 blocks, 2 heads x 16 = 32 hidden   8x8x32 (256 px)            64 + 8 (x 64 ch)    56,928
full       configs/sana_600m.json, 28 blocks    32x32x32 (1024 px)         1024 + 300 (x 2304) 591,747,872
1600m      configs/sana_1600m.json, 20 blocks   32x32x32 (1024 px)         1024 + 300 (x 2304) 1,604,462,752
=========  ===================================  =========================  ==================  =============

With a checkpoint the preset only has to be valid; the input resolution follows the checkpoint's size
(hidden size <= 256: the tiny resolution, else the full one). Inputs: ``hidden_states`` (1, C, H, W),
``encoder_hidden_states`` (1, T, caption_channels), ``timestep`` (1,) float32.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SanaTransformer2DModel as Cls

CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = {"tiny": "sana_600m.json", "full": "sana_600m.json", "1600m": "sana_1600m.json"}
TINY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 16, "cross_attention_dim": 32, "caption_channels": 64, "sample_size": 8}
RESOLUTION = {"tiny": {"latent": 8, "text": 8}, "full": {"latent": 32, "text": 300}}
FULL_PARAMS = 591_747_872          # preset "full" (Sana-600M); "1600m": 1_604_462_752
TINY_PARAMS = 56_928


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
        "encoder_hidden_states": torch.randn(1, text, cfg["caption_channels"], generator=g),
        "timestep": (t * cfg.get("timestep_scale", 1.0)).to(torch.float32),   # as SanaPipeline scales it
        **({"guidance": torch.full((1,), 4.5 * cfg.get("guidance_embeds_scale", 0.1))}
           if cfg.get("guidance_embeds") else {}),                              # Sana-Sprint checkpoints
    }


def _stream(cfg: dict, res: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield _sample(cfg, res, g)


def example_inputs(preset: str = "tiny", checkpoint=None) -> dict:
    """Keyword arguments of ``forward`` (batch 1, deterministic); the caller adds ``return_dict=False``."""
    return next(_stream(*_config(preset, checkpoint), seed=1234))


def calibration_data(preset: str = "tiny", checkpoint=None):
    """Endless deterministic stream of denoiser inputs: noised structured latents, uniform t, N(0,1) text."""
    return _stream(*_config(preset, checkpoint), seed=0)


def training_data(preset: str = "tiny", checkpoint=None):
    return _stream(*_config(preset, checkpoint), seed=1)
