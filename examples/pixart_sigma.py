"""PixArt-Sigma (arXiv 2403.04692): ``diffusers.PixArtTransformer2DModel``, a DiT with cross-attention.

Architecture: patch-2 embedding of an SDXL-VAE latent (4 channels in, 8 out: epsilon + learned variance) with
2-D sin-cos positional embedding, adaLN-single timestep modulation (``norm_type="ada_norm_single"``, norms
without elementwise affine), per block: softmax self-attention, cross-attention to the T5-XXL caption
embedding (projected from 4096 by ``caption_projection``), and a GELU(tanh) MLP (``gelu-approximate``).
DDPM model: timesteps are integers in [0, 1000), passed as int64 like the PixArt pipeline's DPM-Solver does.

Presets (random but deterministic fp32 weights; ``checkpoint=DIR`` loads a local diffusers checkpoint):

=======  ======================================  ===================  ===================  ===========
preset   config                                  latent (resolution)  tokens img + text    parameters
=======  ======================================  ===================  ===================  ===========
tiny     2 blocks, 2 heads x 16 = 32 hidden      16x16x4 (128 px)     64 + 8 (x 64 ch)     54,400
full     configs/pixart_sigma.json, 28 blocks    64x64x4 (512 px)     1024 + 300 (x 4096)  610,856,096
=======  ======================================  ===================  ===================  ===========

The full config is the 1024-px PixArt-Sigma-XL-2 one (sample_size 128); at 512 px the positional embedding
is recomputed for the 32x32 patch grid. With a checkpoint the preset only has to be valid; the input
resolution follows the checkpoint's size (hidden size <= 256: the tiny resolution, else the full one).
Inputs: ``hidden_states`` (1, 4, H, W), ``encoder_hidden_states`` (1, T, caption_channels), ``timestep`` (1,)
int64.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel as Cls

CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = {"tiny": "pixart_sigma.json", "full": "pixart_sigma.json"}
TINY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "cross_attention_dim": 32,
        "caption_channels": 64, "sample_size": 16}
RESOLUTION = {"tiny": {"latent": 16, "text": 8}, "full": {"latent": 64, "text": 300}}
FULL_PARAMS = 610_856_096
TINY_PARAMS = 54_400
#: the PixArt-Sigma scheduler's DDPM schedule: linear betas 1e-4 .. 0.02 over 1000 steps
ALPHAS_CUMPROD = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()


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
    t = torch.randint(0, 1000, (1,), generator=g)             # DDPM: integer t in [0, 1000)
    abar = ALPHAS_CUMPROD[t]
    noise = torch.randn(1, c, side, side, generator=g)
    latents = abar.sqrt() * _clean_latent(c, side, side, g) + (1.0 - abar).sqrt() * noise
    return {
        "hidden_states": latents.contiguous(),
        "encoder_hidden_states": torch.randn(1, text, cfg["caption_channels"], generator=g),
        "timestep": t.to(torch.int64),
    }


def _stream(cfg: dict, res: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield _sample(cfg, res, g)


def example_inputs(preset: str = "tiny", checkpoint=None) -> dict:
    """Keyword arguments of ``forward`` (batch 1, deterministic); the caller adds ``return_dict=False``."""
    return next(_stream(*_config(preset, checkpoint), seed=1234))


def calibration_data(preset: str = "tiny", checkpoint=None):
    """Endless deterministic stream of denoiser inputs: DDPM-noised structured latents, uniform t, N(0,1) text."""
    return _stream(*_config(preset, checkpoint), seed=0)


def training_data(preset: str = "tiny", checkpoint=None):
    return _stream(*_config(preset, checkpoint), seed=1)
