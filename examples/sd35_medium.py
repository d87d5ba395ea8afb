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

import torch
from diffusers import SD3Transformer2DModel as Cls

# shared plumbing of the example files (examples/_common.py; this folder is on sys.path, as with `python x.py`)
from _common import build_model, noised_latent, on_meta, resolve_config, samples

PRESETS = {"tiny": "sd35_medium.json", "full": "sd35_medium.json", "full-meta": "sd35_medium.json"}
TINY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "caption_projection_dim": 32,
        "joint_attention_dim": 64, "pooled_projection_dim": 32, "sample_size": 16, "pos_embed_max_size": 16,
        "dual_attention_layers": [0]}
META_PRESETS = {"full-meta"}            # built under torch.device("meta")
RESOLUTION = {"tiny": {"latent": 16, "text": 8}, "full": {"latent": 64, "text": 333}}
FULL_PARAMS = 2_243_171_520
TINY_PARAMS = 89_344


def _config(preset: str, checkpoint=None) -> tuple[dict, str]:
    """(constructor config, resolution key) for a preset or a checkpoint."""
    return resolve_config(Cls, preset, checkpoint, presets=PRESETS, tiny=TINY, model_file=__file__)


def model(preset: str = "tiny", checkpoint=None) -> torch.nn.Module:
    """The transformer in eval mode, fp32: random deterministic weights, or ``checkpoint``'s weights."""
    cfg, _ = _config(preset, checkpoint)
    return build_model(Cls, cfg, checkpoint, meta=preset in META_PRESETS)


def _sample(cfg: dict, res: str, g: torch.Generator) -> dict:
    side, text = RESOLUTION[res]["latent"], RESOLUTION[res]["text"]
    c = cfg["in_channels"]
    t = torch.rand(1, generator=g) * 1000.0                   # flow matching: t in [0, 1000)
    sigma = t / 1000.0
    latents = noised_latent(c, side, 1.0 - sigma, sigma, g)
    return {
        "hidden_states": latents.contiguous(),
        "encoder_hidden_states": torch.randn(1, text, cfg["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        "timestep": t.to(torch.float32),
    }


def example_inputs(preset: str = "tiny", checkpoint=None) -> dict:
    """Keyword arguments of ``forward`` (batch 1, deterministic); the caller adds ``return_dict=False``.

    For a meta-device preset the tensors are moved to ``meta`` too: meta weights export only with meta inputs.
    """
    inputs = samples(_sample, *_config(preset, checkpoint), seed=1234)[0]
    return on_meta(inputs) if checkpoint is None and preset in META_PRESETS else inputs


def calibration_data(preset: str = "tiny", checkpoint=None):
    """Endless deterministic stream of denoiser inputs: noised structured latents, uniform t, N(0,1) text + pooled."""
    return iter(samples(_sample, *_config(preset, checkpoint), seed=0))


def training_data(preset: str = "tiny", checkpoint=None):
    return samples(_sample, *_config(preset, checkpoint), seed=1)
