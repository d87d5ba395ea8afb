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

Pipeline (``pipeline()``, for ``fbqc capture`` / ``eval``): a ``StableDiffusion3Pipeline`` around ``model()``.
Tiny, built offline with seeded weights: two word-level CLIP tokenizers (4 tokens) and ``CLIPTextModelWithProjection``
stand-ins (16 + 16 wide: pooled 32), a T5 tokenizer (4 tokens) and ``T5EncoderModel`` stand-in (64 wide), a
small ``AutoencoderKL`` (16 latent channels, 8x: 128 px <-> 16x16 latent), ``FlowMatchEulerDiscreteScheduler``
(shift 3.0). ``full``: the full transformer with stand-ins (CLIP 768 + 1280 at 77 tokens, T5 4096 at 256, small
VAE at 512 px): only the transformer is full size; ``full-meta`` has no pipeline. ``generation_defaults()``:
tiny 128 px, 8 steps, guidance 7.0; full / checkpoint 512 px, 28 steps, 7.0.
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


# ---- pipeline (fbqc capture / eval) ----------------------------------------------------------------

#: the SD3 VAE downsamples 8x: tiny 16x16 latent = 128 px, full 64x64 = 512 px
VAE_SCALE = 8
#: text tokens = CLIP tokens (the CLIP tokenizers' model_max_length) + T5 tokens (max_sequence_length)
CLIP_TOKENS = {"tiny": 4, "full": 77}


def pipeline(preset: str = "tiny", checkpoint=None):
    """A ``diffusers.StableDiffusion3Pipeline`` whose ``.transformer`` is ``model(preset, checkpoint)``.

    ``checkpoint=DIR``: the local diffusers pipeline directory (``model_index.json`` required). Otherwise
    every component is built offline with seeded weights: two CLIP stand-ins (``CLIPTextModelWithProjection``,
    2 layers; their projections, concatenated, are the ``pooled_projection_dim`` pooled embedding; their
    penultimate hidden states, concatenated and zero-padded, the first ``CLIP_TOKENS`` text tokens), a T5
    stand-in (``joint_attention_dim`` wide, the remaining tokens), a small ``AutoencoderKL`` (16 latent channels,
    8x downsampling, SD3 scaling/shift factors, no quant convs) and SD3's ``FlowMatchEulerDiscreteScheduler``
    (shift 3.0). Tiny: CLIP widths 16 + 16, text 4 CLIP + 4 T5 tokens. For ``full`` only the transformer is full
    size: CLIP-L/G stand-ins of widths 768 / 1280 (77 tokens), T5 4096 (256 tokens), a small VAE (for measuring
    capture cost, not image quality). ``full-meta`` has no weights: use ``--checkpoint DIR``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from _pipelines import clip, finish, kl_vae, load_pipeline, t5, tokenizer

    if checkpoint is None and preset in META_PRESETS:
        raise ValueError(f"SD3.5-Medium {preset} is built on the meta device (no weights to run); "
                         "use preset 'full' or --checkpoint DIR")
    transformer = model(preset, checkpoint)
    if checkpoint is not None:
        return load_pipeline(StableDiffusion3Pipeline, checkpoint, transformer)
    cfg, res = _config(preset)
    n_clip = CLIP_TOKENS[res]
    half = cfg["pooled_projection_dim"] // 2
    widths = (half, half) if res == "tiny" else (768, 1280)            # CLIP-L, CLIP-G
    return finish(StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=kl_vae(cfg["in_channels"], scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False, seed=2),
        text_encoder=clip(widths[0], n_clip, projection=widths[0], seed=3), tokenizer=tokenizer("clip", n_clip),
        text_encoder_2=clip(widths[1], n_clip, projection=cfg["pooled_projection_dim"] - widths[0], seed=4),
        tokenizer_2=tokenizer("clip", n_clip),
        text_encoder_3=t5(cfg["joint_attention_dim"], seed=1),
        tokenizer_3=tokenizer("t5", RESOLUTION[res]["text"] - n_clip)))


def generation_defaults(preset: str = "tiny", checkpoint=None) -> dict:
    """Keyword arguments of the pipeline call for ``fbqc capture`` / ``eval`` (the user may override them).

    The resolution gives the latent of ``example_inputs``; ``max_sequence_length`` (T5 tokens) plus the CLIP
    tokenizers' length its text length. Tiny: 8 steps, guidance 7.0. Full / checkpoint: the pipeline's defaults,
    28 steps, guidance 7.0 (the SD3.5-Medium model card suggests 40 steps at 4.5), at 512 px, 256 T5 tokens.
    """
    _, res = _config(preset, checkpoint)
    side = RESOLUTION[res]["latent"] * VAE_SCALE
    return {"height": side, "width": side, "num_inference_steps": 8 if res == "tiny" else 28, "guidance_scale": 7.0,
            "max_sequence_length": RESOLUTION[res]["text"] - CLIP_TOKENS[res]}
