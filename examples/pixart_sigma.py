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
Inputs: ``hidden_states`` (1, 4, H, W), ``encoder_hidden_states`` (1, T, caption_channels),
``encoder_attention_mask`` (1, T) int64 (1: token, 0: padding; the pipeline pads the negative prompt),
``timestep`` (1,) int64.

Pipeline (``pipeline()``, for ``fbqc capture`` / ``eval``): a ``PixArtSigmaPipeline`` around ``model()``. Tiny,
built offline with seeded weights: a word-level T5-style tokenizer (``examples/_pipelines.py``, 8 tokens), a
2-layer ``T5EncoderModel`` stand-in 64 wide, a small ``AutoencoderKL`` (4 latent channels, 8x downsampling:
128 px <-> 16x16 latent) and PixArt-Sigma's DPM-Solver++ scheduler (epsilon, linear betas). The pipeline passes
``timestep`` as int64, as ``example_inputs``. ``full``: the full transformer with stand-ins (T5 4096 wide, 300
tokens, small VAE at 512 px): only the transformer is full size. ``generation_defaults()``: tiny 128 px, 8
steps, guidance 4.5; full / checkpoint 512 px, 20 steps, 4.5; resolution binning off.
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
        "encoder_attention_mask": torch.ones(1, text, dtype=torch.int64),     # the pipeline's (padding: 0)
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


# ---- pipeline (fbqc capture / eval) ----------------------------------------------------------------

#: the SDXL VAE downsamples 8x: tiny 16x16 latent = 128 px, full 64x64 = 512 px
VAE_SCALE = 8


def pipeline(preset: str = "tiny", checkpoint=None):
    """A ``diffusers.PixArtSigmaPipeline`` whose ``.transformer`` is ``model(preset, checkpoint)``.

    ``checkpoint=DIR``: the local diffusers pipeline directory (``model_index.json`` required). Otherwise
    every component is built offline with seeded weights: a T5 stand-in (``T5EncoderModel``, ``caption_channels``
    wide, 2 layers), a small ``AutoencoderKL`` (4 latent channels, 8x downsampling, SDXL-VAE scaling factor),
    and PixArt-Sigma's DPM-Solver++ scheduler (linear betas 1e-4..0.02, epsilon prediction). For ``full``
    only the transformer is full size: the text encoder and VAE are small stand-ins (for measuring capture
    cost, not image quality).
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from _pipelines import finish, kl_vae, load_pipeline, t5, tokenizer

    transformer = model(preset, checkpoint)
    if checkpoint is not None:
        return load_pipeline(PixArtSigmaPipeline, checkpoint, transformer)
    cfg, res = _config(preset)
    scheduler = DPMSolverMultistepScheduler(        # PixArt-Sigma-XL-2-1024-MS' scheduler_config
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, solver_order=2,
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        timestep_spacing="linspace", steps_offset=0)
    return finish(PixArtSigmaPipeline(
        tokenizer=tokenizer("t5", RESOLUTION[res]["text"]), text_encoder=t5(cfg["caption_channels"], seed=1),
        vae=kl_vae(4, scaling_factor=0.13025, seed=2), transformer=transformer, scheduler=scheduler))


def generation_defaults(preset: str = "tiny", checkpoint=None) -> dict:
    """Keyword arguments of the pipeline call for ``fbqc capture`` / ``eval`` (the user may override them).

    The resolution gives the latent of ``example_inputs``; ``max_sequence_length`` its text length. Resolution
    binning is off: the tiny sample size has no bin, and the full config (sample size 128) would bin 512 px up to
    1024 px. ``clean_caption=False``: cleaning needs ``bs4``/``ftfy`` (absent, the pipeline falls back with a
    warning). Tiny: 8 steps, guidance 4.5; full / checkpoint: the pipeline's 20 steps, 4.5, at 512 px.
    """
    _, res = _config(preset, checkpoint)
    side = RESOLUTION[res]["latent"] * VAE_SCALE
    return {"height": side, "width": side, "num_inference_steps": 8 if res == "tiny" else 20, "guidance_scale": 4.5,
            "max_sequence_length": RESOLUTION[res]["text"], "use_resolution_binning": False, "clean_caption": False}
