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

import torch
from diffusers import SanaTransformer2DModel as Cls

# shared plumbing of the example files (examples/_common.py; this folder is on sys.path, as with `python x.py`)
from _common import build_model, noised_latent, resolve_config, samples

PRESETS = {"tiny": "sana_600m.json", "full": "sana_600m.json", "1600m": "sana_1600m.json"}
TINY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 16, "cross_attention_dim": 32, "caption_channels": 64, "sample_size": 8}
RESOLUTION = {"tiny": {"latent": 8, "text": 8}, "full": {"latent": 32, "text": 300}}
FULL_PARAMS = 591_747_872          # preset "full" (Sana-600M); "1600m": 1_604_462_752
TINY_PARAMS = 56_928


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
    t = torch.rand(1, generator=g) * 1000.0                   # flow matching: t in [0, 1000)
    sigma = t / 1000.0
    latents = noised_latent(c, side, 1.0 - sigma, sigma, g)
    return {
        "hidden_states": latents.contiguous(),
        "encoder_hidden_states": torch.randn(1, text, cfg["caption_channels"], generator=g),
        "timestep": (t * cfg.get("timestep_scale", 1.0)).to(torch.float32),   # as SanaPipeline scales it
        **({"guidance": torch.full((1,), 4.5 * cfg.get("guidance_embeds_scale", 0.1))}
           if cfg.get("guidance_embeds") else {}),                              # Sana-Sprint checkpoints
    }


def example_inputs(preset: str = "tiny", checkpoint=None) -> dict:
    """Keyword arguments of ``forward`` (batch 1, deterministic); the caller adds ``return_dict=False``."""
    return samples(_sample, *_config(preset, checkpoint), seed=1234)[0]


def calibration_data(preset: str = "tiny", checkpoint=None):
    """Endless deterministic stream of denoiser inputs: noised structured latents, uniform t, N(0,1) text."""
    return iter(samples(_sample, *_config(preset, checkpoint), seed=0))


def training_data(preset: str = "tiny", checkpoint=None):
    return samples(_sample, *_config(preset, checkpoint), seed=1)
