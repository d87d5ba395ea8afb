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
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel as Cls

CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = {"tiny": "flux_schnell.json", "full": "flux_schnell.json"}
TINY = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
        "joint_attention_dim": 64, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]}
META_PRESETS = {"full"}                 # built under torch.device("meta")
RESOLUTION = {"tiny": {"latent": 16, "text": 8}, "full": {"latent": 64, "text": 256}}   # unpacked latent side
FULL_PARAMS = 11_891_178_560
TINY_PARAMS = 73_408


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
    c, h = cfg["in_channels"] // 4, side // 2                 # 2x2 packing: 16 latent channels -> 64
    t = torch.rand(1, generator=g)                            # sigma = pipeline t / 1000, in [0, 1)
    noise = torch.randn(1, c, side, side, generator=g)
    latents = (1.0 - t) * _clean_latent(c, side, side, g) + t * noise
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
