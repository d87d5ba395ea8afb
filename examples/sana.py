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
``encoder_hidden_states`` (1, T, caption_channels), ``encoder_attention_mask`` (1, T) int64 (1: token,
0: padding; the pipeline pads the negative prompt), ``timestep`` (1,) float32.

Pipeline (``pipeline()``, for ``fbqc capture`` / ``eval``): a ``SanaPipeline`` around ``model()``. Tiny, built
offline with seeded weights: a word-level Gemma-style tokenizer (``examples/_pipelines.py``, 8 tokens), a
2-layer ``Gemma2Model`` stand-in 64 wide (= caption_channels), a small ``AutoencoderDC`` (32 latent channels,
32x downsampling: 256 px <-> 8x8 latent) and Sana's DPM-Solver++ flow scheduler (``flow_shift`` 3.0).
``full`` / ``1600m``: the full transformer with stand-ins of the same kind (Gemma-2 2304 wide, 300 tokens,
small DC-AE at 1024 px): only the transformer is full size (capture cost, not image quality).
``generation_defaults()``: tiny 256 px, 8 steps, guidance 4.5; full / checkpoint 1024 px, 20 steps, 4.5.
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
        "encoder_attention_mask": torch.ones(1, text, dtype=torch.int64),     # SanaPipeline's (padding: 0)
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


# ---- pipeline (fbqc capture / eval) ----------------------------------------------------------------

#: generation resolution per resolution key: DC-AE downsamples 32x (tiny 8x8 latent = 256 px, full 32x32 = 1024 px)
VAE_SCALE = 32


def pipeline(preset: str = "tiny", checkpoint=None):
    """A ``diffusers.SanaPipeline`` whose ``.transformer`` is ``model(preset, checkpoint)``.

    ``checkpoint=DIR``: the local diffusers pipeline directory (``model_index.json`` required). Otherwise
    every component is built offline with seeded weights: the Gemma-2 stand-in has ``caption_channels`` width,
    the DC-AE has 32 latent channels and 32x downsampling (widths 8..32), the scheduler is Sana's published
    one. For ``full`` / ``1600m`` only the transformer is full size: the text encoder and VAE are small stand-ins
    (for measuring capture cost, not image quality).
    """
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    from _pipelines import dc_ae, finish, gemma2, load_pipeline, tokenizer

    transformer = model(preset, checkpoint)
    if checkpoint is not None:
        return load_pipeline(SanaPipeline, checkpoint, transformer)
    cfg, res = _config(preset)
    scheduler = DPMSolverMultistepScheduler(        # Sana_600M_1024px_diffusers' scheduler_config
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, solver_order=2,
        prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero")
    return finish(SanaPipeline(
        tokenizer=tokenizer("gemma", RESOLUTION[res]["text"]), text_encoder=gemma2(cfg["caption_channels"], seed=1),
        vae=dc_ae(cfg["in_channels"], scaling_factor=0.41407, seed=2), transformer=transformer, scheduler=scheduler))


def generation_defaults(preset: str = "tiny", checkpoint=None) -> dict:
    """Keyword arguments of the pipeline call for ``fbqc capture`` / ``eval`` (the user may override them).

    The resolution gives the latent of ``example_inputs``; ``max_sequence_length`` its text length. Resolution
    binning is off (the tiny transformer's sample size has no bin). Tiny: 8 steps, no complex-human-instruction
    prefix (its words are unknown to the tiny vocabulary; the token count would be the same). Full / checkpoint:
    SanaPipeline's defaults, 20 steps, guidance 4.5, at 1024 px.
    """
    _, res = _config(preset, checkpoint)
    side = RESOLUTION[res]["latent"] * VAE_SCALE
    out = {"height": side, "width": side, "guidance_scale": 4.5, "max_sequence_length": RESOLUTION[res]["text"],
           "use_resolution_binning": False}
    if res == "tiny":
        return {**out, "num_inference_steps": 8, "complex_human_instruction": None}
    return {**out, "num_inference_steps": 20}
