"""FLUX.1-schnell (Black Forest Labs): ``diffusers.FluxTransformer2DModel``, a rectified-flow MMDiT.

Architecture: the 16-channel FLUX-VAE latent is packed 2x2 into 64-channel tokens (``x_embedder`` is a
linear layer); timestep + pooled CLIP-L (768) conditioning (schnell: no guidance embedding); 3-axis RoPE
from ``img_ids``/``txt_ids`` (axes 16/56/56); 19 double-stream blocks (``transformer_blocks``: separate
image/text adaLN-Zero, QKV, RMS q/k norm, GELU(tanh) MLPs, joint attention) followed by 38 single-stream
blocks (``single_transformer_blocks``: one fused stream, parallel attention + MLP, ``proj_out``).
Timesteps are floats in [0, 1]: the FLUX pipeline passes ``t / 1000`` (= sigma) and the model multiplies
by 1000 itself.

Presets (random but deterministic fp32 weights; ``checkpoint=DIR`` loads a local diffusers checkpoint):

======  =========================================================  =================  ===================  ==============
preset  config                                                     latent (res.)      tokens img + text    parameters
======  =========================================================  =================  ===================  ==============
tiny    1 double + 1 single block, 2 heads x 16 = 32, RoPE 4/6/6   16x16x16 (128 px)  64 + 8 (x 64 ch)     73,408
full    configs/flux_schnell.json, 19 + 38 blocks, 24 x 128        64x64x16 (512 px)  1024 + 256 (x 4096)  11,891,178,560
======  =========================================================  =================  ===================  ==============

``full`` is built under ``torch.device("meta")``: 11.9 B parameters are 48 GB in fp32, more than a 24 GiB
machine holds, so its parameters have no data: no forward, no calibration, but ``torch.export`` works (~20 s,
< 1 GB). Meta weights export only with meta inputs, so ``example_inputs("full")`` returns meta tensors
(``torch.export.export(model("full"), (), {**example_inputs("full"), "return_dict": False}, strict=False)``);
``calibration_data("full")`` yields real CPU tensors of the same shapes/dtypes. ``img_ids`` /
``txt_ids`` are 2-D (tokens, 3) float32, built as the diffusers 0.42 FluxPipeline does (txt_ids zeros,
img_ids (0, row, col)). With a checkpoint the preset only has to be valid; the input resolution follows the
checkpoint's size (hidden size <= 256: the tiny resolution, else the full one). Inputs: ``hidden_states``
(1, N, 64), ``encoder_hidden_states`` (1, T, 4096), ``pooled_projections`` (1, 768), ``timestep`` (1,)
float32, ``img_ids`` (N, 3), ``txt_ids`` (T, 3).

Pipeline (``pipeline()``, for ``fbqc capture`` / ``eval``): a ``FluxPipeline`` around ``model()``. Tiny, built
offline with seeded weights: a word-level CLIP tokenizer (77 tokens) and ``CLIPTextModel`` stand-in (32 wide:
its pooled output), a T5 tokenizer (8 tokens) and ``T5EncoderModel`` stand-in (64 wide), a small
``AutoencoderKL`` (16 latent channels, 8x: 128 px <-> 16x16 latent, packed to 64 tokens), and schnell's
``FlowMatchEulerDiscreteScheduler`` (shift 1.0, no dynamic shifting). ``full`` lives on the meta device: no
pipeline (``--checkpoint DIR`` instead). ``generation_defaults()``: 4 steps, guidance 0 (no CFG), 128 px tiny,
512 px full / checkpoint.
"""
from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel as Cls

# shared plumbing of the example files (examples/_common.py; this folder is on sys.path, as with `python x.py`)
from _common import build_model, noised_latent, on_meta, resolve_config, samples

PRESETS = {"tiny": "flux_schnell.json", "full": "flux_schnell.json"}
TINY = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
        "joint_attention_dim": 64, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]}
META_PRESETS = {"full"}                 # built under torch.device("meta")
RESOLUTION = {"tiny": {"latent": 16, "text": 8}, "full": {"latent": 64, "text": 256}}   # unpacked latent side
FULL_PARAMS = 11_891_178_560
TINY_PARAMS = 73_408


def _config(preset: str, checkpoint=None) -> tuple[dict, str]:
    """(constructor config, resolution key) for a preset or a checkpoint."""
    return resolve_config(Cls, preset, checkpoint, presets=PRESETS, tiny=TINY, model_file=__file__)


def model(preset: str = "tiny", checkpoint=None) -> torch.nn.Module:
    """The transformer in eval mode, fp32: random deterministic weights, or ``checkpoint``'s weights."""
    cfg, _ = _config(preset, checkpoint)
    return build_model(Cls, cfg, checkpoint, meta=preset in META_PRESETS)


def _sample(cfg: dict, res: str, g: torch.Generator) -> dict:
    side, text = RESOLUTION[res]["latent"], RESOLUTION[res]["text"]
    c, h = cfg["in_channels"] // 4, side // 2                 # 2x2 packing: 16 latent channels -> 64
    t = torch.rand(1, generator=g)                            # sigma = pipeline t / 1000, in [0, 1)
    latents = noised_latent(c, side, 1.0 - t, t, g)
    packed = latents.view(1, c, h, 2, h, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, h * h, c * 4)
    img_ids = torch.zeros(h, h, 3)
    img_ids[..., 1] += torch.arange(h)[:, None]
    img_ids[..., 2] += torch.arange(h)[None, :]
    return {
        "hidden_states": packed.contiguous(),
        "encoder_hidden_states": torch.randn(1, text, cfg["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        "timestep": t.to(torch.float32),
        "img_ids": img_ids.reshape(h * h, 3),
        "txt_ids": torch.zeros(text, 3),
        **({"guidance": torch.full((1,), 3.5)} if cfg.get("guidance_embeds") else {}),   # FLUX.1-dev checkpoints
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

#: the FLUX VAE downsamples 8x: tiny 16x16 latent = 128 px, full 64x64 = 512 px
VAE_SCALE = 8


def pipeline(preset: str = "tiny", checkpoint=None):
    """A ``diffusers.FluxPipeline`` whose ``.transformer`` is ``model(preset, checkpoint)``.

    ``checkpoint=DIR``: the local diffusers pipeline directory (``model_index.json`` required), e.g. a saved
    FLUX.1-schnell. The tiny preset builds every component offline with seeded weights: a CLIP stand-in
    (``CLIPTextModel``, ``pooled_projection_dim`` = 32 wide: its pooled output), a T5 stand-in
    (``joint_attention_dim`` = 64 wide, 8 tokens), a small ``AutoencoderKL`` (16 latent channels, 8x
    downsampling, FLUX scaling/shift factors, no quant convs) and schnell's ``FlowMatchEulerDiscreteScheduler``
    (shift 1.0, no dynamic shifting). ``full`` is built on the meta device and cannot run: a ValueError.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from _pipelines import clip, finish, kl_vae, load_pipeline, t5, tokenizer

    if checkpoint is None and preset in META_PRESETS:
        raise ValueError(f"FLUX {preset} is built on the meta device (no weights to run); use --checkpoint DIR")
    transformer = model(preset, checkpoint)
    if checkpoint is not None:
        return load_pipeline(FluxPipeline, checkpoint, transformer)
    cfg, res = _config(preset)
    scheduler = FlowMatchEulerDiscreteScheduler(     # FLUX.1-schnell's scheduler_config
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return finish(FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=kl_vae(cfg["in_channels"] // 4, scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False, seed=2),
        text_encoder=clip(cfg["pooled_projection_dim"], 77, seed=3), tokenizer=tokenizer("clip", 77),
        text_encoder_2=t5(cfg["joint_attention_dim"], seed=1), tokenizer_2=tokenizer("t5", RESOLUTION[res]["text"])))


def generation_defaults(preset: str = "tiny", checkpoint=None) -> dict:
    """Keyword arguments of the pipeline call for ``fbqc capture`` / ``eval`` (the user may override them).

    FLUX.1-schnell is guidance-distilled: 4 steps, ``guidance_scale`` 0 (no classifier-free guidance), at the
    resolution whose latent ``example_inputs`` has (128 px tiny, 512 px full / checkpoint); ``max_sequence_length``
    its T5 text length (8 tiny, 256 full: schnell's maximum).
    """
    _, res = _config(preset, checkpoint)
    side = RESOLUTION[res]["latent"] * VAE_SCALE
    return {"height": side, "width": side, "num_inference_steps": 4, "guidance_scale": 0.0,
            "max_sequence_length": RESOLUTION[res]["text"]}
