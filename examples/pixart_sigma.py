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

import torch
from diffusers import PixArtTransformer2DModel as Cls

# shared plumbing of the example files (examples/_common.py; this folder is on sys.path, as with `python x.py`)
from _common import build_model, noised_latent, resolve_config, samples

PRESETS = {"tiny": "pixart_sigma.json", "full": "pixart_sigma.json"}
TINY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "cross_attention_dim": 32,
        "caption_channels": 64, "sample_size": 16}
RESOLUTION = {"tiny": {"latent": 16, "text": 8}, "full": {"latent": 64, "text": 300}}
FULL_PARAMS = 610_856_096
TINY_PARAMS = 54_400
#: the PixArt-Sigma scheduler's DDPM schedule: linear betas 1e-4 .. 0.02 over 1000 steps
ALPHAS_CUMPROD = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()


def _config(preset: str, checkpoint=None) -> tuple[dict, str]:
    """(constructor config, resolution key) for a preset or a checkpoint."""
    return resolve_config(Cls, preset, checkpoint, presets=PRESETS, tiny=TINY, model_file=__file__)


def model(preset: str = "tiny", checkpoint=None) -> torch.nn.Module:
    """The transformer in eval mode, fp32: random deterministic weights, or ``checkpoint``'s weights."""
    cfg, _ = _config(preset, checkpoint)
    return build_model(Cls, cfg, checkpoint)


def _sample(cfg: dict, res: str, g: torch.Generator) -> dict:
    side, text = RESOLUTION[res]["latent"], RESOLUTION[res]["text"]
    c = cfg["in_channels"]
    t = torch.randint(0, 1000, (1,), generator=g)             # DDPM: integer t in [0, 1000)
    abar = ALPHAS_CUMPROD[t]
    latents = noised_latent(c, side, abar.sqrt(), (1.0 - abar).sqrt(), g)
    return {
        "hidden_states": latents.contiguous(),
        "encoder_hidden_states": torch.randn(1, text, cfg["caption_channels"], generator=g),
        "timestep": t.to(torch.int64),
    }


def example_inputs(preset: str = "tiny", checkpoint=None) -> dict:
    """Keyword arguments of ``forward`` (batch 1, deterministic); the caller adds ``return_dict=False``."""
    return samples(_sample, *_config(preset, checkpoint), seed=1234)[0]


def calibration_data(preset: str = "tiny", checkpoint=None):
    """Endless deterministic stream of denoiser inputs: DDPM-noised structured latents, uniform t, N(0,1) text."""
    return iter(samples(_sample, *_config(preset, checkpoint), seed=0))


def training_data(preset: str = "tiny", checkpoint=None):
    return samples(_sample, *_config(preset, checkpoint), seed=1)
