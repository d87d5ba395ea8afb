"""The four architectures of the paper table (benchmarks/paper_table.py), behind one interface.

Each :class:`Arch` builds a tiny, freshly initialised (``torch.manual_seed(0)``), fp32 diffusers transformer
for 1-channel ``size``×``size`` images, class-conditioned through a ``caption`` of shape (N, T, C), and
translates the benchmark's rectified-flow batch (x_t = (1-σ)x0 + σε, target v = ε - x0) into that model's
forward keyword arguments and its output back into a velocity image (N, 1, S, S)::

    arch = ARCHS["flux"]
    model = arch.make(width=64, layers=4, size=8, caption=16)
    kwargs = arch.inputs(x_t, caption, sigma)                   # the caller adds return_dict=False
    v = arch.velocity(model(**kwargs, return_dict=False), size=8)

All four: 2 heads of ``width // 2``, hidden size ``width``, caption embedding dim ``caption``, patch 1
(FLUX: 2×2 latent packing, its own "patch"), one image channel in and out, no guidance / size
conditioning. ``layers`` is the depth of the Sana and PixArt stacks; SD3's joint blocks and FLUX's
double-stream blocks carry two streams (image + text, each with its own adaLN, attention projections
and MLP), about twice a Sana block, so their depth is scaled to keep the parameter counts (and the
number of quantized weights) comparable. Parameters at width 64, layers 4, size 8, caption 16
(total / inside the blocks, i.e. what AnnotateLinears quantizes by default):

======  =====================================================  =======  =========
arch    blocks                                                 params   in blocks
======  =====================================================  =======  =========
sana    ``layers`` = 4 (paper_table.make_teacher's arguments)  322,049  270,848
pixart  ``layers`` = 4                                         318,145  267,008
sd3     ``max(1, layers // 2)`` = 2 joint, block 0 dual-attn   309,441  273,984
flux    ``max(1, layers // 4)`` = 1 double                     309,764  273,920
        + ``max(1, layers // 2)`` = 2 single
======  =====================================================  =======  =========

(For reference: SD3 with 4 joint blocks has 608,193 params; FLUX with 2 double + 2 single 459,268.)

Per architecture:

* Sana (``SanaTransformer2DModel``): paper_table.make_teacher's constructor, unchanged (the existing
  Sana table must not move). Timestep σ·1000.
* PixArt (``PixArtTransformer2DModel``): adaLN-single, ``out_channels=1`` (no learned variance),
  ``use_additional_conditions=False`` (no resolution / aspect-ratio ``added_cond_kwargs``; diffusers
  would turn them on only for ``sample_size == 128``), ``caption_channels=caption``,
  ``cross_attention_dim=width``, ``interpolation_scale=1``. PixArt is a DDPM model upstream; here it is
  trained with the same rectified-flow objective and given σ·1000 as a float timestep (its sinusoidal
  timestep embedding takes floats). No ``encoder_attention_mask`` (every caption token is valid).
* SD3 (``SD3Transformer2DModel``): patch 1 is accepted; ``pos_embed_max_size=size`` (the cropped
  sin-cos table is exactly the image grid), ``joint_attention_dim=pooled_projection_dim=caption``,
  ``caption_projection_dim=width``, ``dual_attention_layers=(0,)`` (SD3.5's MMDiT-X self-attention
  branch in the first block, as examples/sd35_medium.py; it also brings the parameter count closest
  to Sana's). Pooled projection: ``caption.mean(1)``. Timestep σ·1000.
* FLUX (``FluxTransformer2DModel``): 2×2 packing of the 1-channel image (``in_channels=4``, 8×8 → 16
  tokens; :func:`pack` / :func:`unpack`, as diffusers' FluxPipeline), ``patch_size=1``,
  ``joint_attention_dim=pooled_projection_dim=caption``, ``guidance_embeds=False`` (schnell-like),
  ``axes_dims_rope`` summing to the head dim (:func:`rope_axes`: (8, 12, 12) at head dim 32).
  ``img_ids`` (tokens, 3) = (0, row, col) of the packed grid and ``txt_ids`` (T, 3) = zeros, both 2-D
  without a batch dimension (diffusers deprecates 3-D ids) and float32 on x_t's device. Timestep: σ in
  [0, 1] (FLUX multiplies by 1000 inside). Pooled projection: ``caption.mean(1)``.

Determinism: every forward / backward op of the four runs under ``torch.use_deterministic_algorithms(True)``
on CPU (tests/test_paper_archs.py); none of them is an index_add / scatter / index_put-accumulate /
interpolation / cumsum, the ops without a deterministic CUDA kernel. Checked once on an H200 (torch
2.11+cu130, not in CI): 20 AdamW steps of each arch at width 64, layers 4, batch 64 under deterministic
mode ran without a warning and gave bitwise-identical weights twice, with and without
``CUBLAS_WORKSPACE_CONFIG`` set; attention dispatched to SDPA's memory-efficient kernel (forward and
backward) for all four.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

HEADS = 2


def pack(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) image → (N, (H/2)(W/2), 4C) tokens: each 2×2 patch, channel-major (FluxPipeline._pack_latents)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size: int, channels: int = 1) -> torch.Tensor:
    """The inverse of :func:`pack` for a ``size``×``size`` image: (N, (S/2)², 4C) → (N, C, S, S)."""
    n, h = tokens.shape[0], size // 2
    return tokens.view(n, h, h, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, channels, size, size)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's 3-axis RoPE split of ``head_dim`` (all even, summing to it): (8, 12, 12) at 32, (4, 6, 6) at 16."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"FLUX needs an even head dim of at least 6 (width a multiple of 4, >= 12), got {head_dim}")
    b = max(2, 2 * (head_dim * 3 // 16))
    return head_dim - 2 * b, b, b


def flux_ids(size: int, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids (size/2)² × 3 = (0, row, col) of the packed grid, txt_ids tokens × 3 = zeros), float32, 2-D."""
    h = size // 2
    img = torch.zeros(h, h, 3, device=device)
    img[..., 1] += torch.arange(h, device=device)[:, None]
    img[..., 2] += torch.arange(h, device=device)[None, :]
    return img.reshape(h * h, 3), torch.zeros(tokens, 3, device=device)


def _sana(width: int, layers: int, size: int, caption: int) -> dict:
    hd = width // HEADS
    return dict(in_channels=1, out_channels=1, num_attention_heads=HEADS, attention_head_dim=hd, num_layers=layers,
                num_cross_attention_heads=HEADS, cross_attention_head_dim=hd, cross_attention_dim=width,
                caption_channels=caption, sample_size=size, patch_size=1, interpolation_scale=1)


def _pixart(width: int, layers: int, size: int, caption: int) -> dict:
    return dict(num_attention_heads=HEADS, attention_head_dim=width // HEADS, in_channels=1, out_channels=1,
                num_layers=layers, cross_attention_dim=width, sample_size=size, patch_size=1,
                interpolation_scale=1, use_additional_conditions=False, caption_channels=caption)


def _sd3(width: int, layers: int, size: int, caption: int) -> dict:
    return dict(sample_size=size, patch_size=1, in_channels=1, out_channels=1, num_layers=max(1, layers // 2),
                attention_head_dim=width // HEADS, num_attention_heads=HEADS, joint_attention_dim=caption,
                caption_projection_dim=width, pooled_projection_dim=caption, pos_embed_max_size=size,
                dual_attention_layers=(0,))


def _flux(width: int, layers: int, size: int, caption: int) -> dict:
    if size % 2:
        raise ValueError(f"FLUX packs 2×2 patches: the image size must be even, got {size}")
    return dict(patch_size=1, in_channels=4, out_channels=4, num_layers=max(1, layers // 4),
                num_single_layers=max(1, layers // 2), attention_head_dim=width // HEADS,
                num_attention_heads=HEADS, joint_attention_dim=caption, pooled_projection_dim=caption,
                guidance_embeds=False, axes_dims_rope=rope_axes(width // HEADS))


class Arch:
    """One architecture: constructor arguments, forward inputs and output for the rectified-flow benchmark.

    (A plain class, not a dataclass: the benchmark and tests load this file by path with importlib,
    without registering it in ``sys.modules``, which ``dataclasses`` needs.)
    """

    def __init__(self, name: str, cls_name: str, label: str, config: Callable[[int, int, int, int], dict], *,
                 pooled: bool = False, packed: bool = False, timestep_scale: float = 1000.0):
        self.name = name                      # "sana", "pixart", "sd3", "flux"
        self.cls_name = cls_name              # the diffusers class, e.g. "SanaTransformer2DModel"
        self.label = label                    # "Sana", "PixArt", "SD3", "FLUX"
        self._config = config
        self.pooled = pooled                  # takes pooled_projections (caption.mean(1))
        self.packed = packed                  # FLUX: 2×2-packed tokens, img_ids / txt_ids
        self.timestep_scale = timestep_scale  # timestep = σ · this (FLUX: 1, it multiplies by 1000 inside)

    def __repr__(self) -> str:
        return f"Arch({self.name!r}, {self.cls_name})"

    @property
    def cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.cls_name)

    def config(self, width: int, layers: int, size: int, caption: int) -> dict:
        """The constructor keyword arguments (see the module docstring for the choices)."""
        if width % HEADS:
            raise ValueError(f"width {width} is not a multiple of the {HEADS} heads")
        return self._config(width, layers, size, caption)

    def make(self, width: int, layers: int, size: int, caption: int) -> torch.nn.Module:
        """A freshly initialised fp32 model (``torch.manual_seed(0)`` first, as paper_table.make_teacher)."""
        cfg = self.config(width, layers, size, caption)
        torch.manual_seed(0)
        return self.cls(**cfg)

    def params(self, width: int, layers: int, size: int = 8, caption: int = 16) -> int:
        """Parameter count (built on the meta device; the global RNG is left untouched)."""
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = self.cls(**self.config(width, layers, size, caption))
        return sum(p.numel() for p in model.parameters())

    def blocks(self, layers: int) -> str:
        cfg = self._config(64, layers, 8, 16)
        if self.packed:
            return f"{cfg['num_layers']} double + {cfg['num_single_layers']} single blocks"
        n = cfg["num_layers"]
        return f"{n} block{'s' * (n != 1)}"

    def describe(self, width: int, layers: int, size: int = 8, caption: int = 16) -> str:
        """One line, e.g. ``Sana (4 blocks, width 64, 322,049 params)``."""
        return f"{self.label} ({self.blocks(layers)}, width {width}, {self.params(width, layers, size, caption):,} params)"

    def inputs(self, x_t: torch.Tensor, caption: torch.Tensor, sigma: torch.Tensor) -> dict[str, Any]:
        """Forward keyword arguments (without ``return_dict``) for x_t (N, 1, S, S), caption (N, T, C),
        σ (N,) in [0, 1]; every tensor on x_t's device."""
        dev = x_t.device
        caption = caption.to(dev)
        t = sigma.to(dev, torch.float32) * self.timestep_scale
        if self.packed:
            img_ids, txt_ids = flux_ids(x_t.shape[-1], caption.shape[1], dev)
            return {"hidden_states": pack(x_t), "encoder_hidden_states": caption,
                    "pooled_projections": caption.mean(1), "timestep": t, "img_ids": img_ids, "txt_ids": txt_ids}
        out = {"hidden_states": x_t, "encoder_hidden_states": caption, "timestep": t}
        if self.pooled:
            out["pooled_projections"] = caption.mean(1)
        return out

    def velocity(self, output, size: int) -> torch.Tensor:
        """The predicted velocity (N, 1, S, S) from the model's output (a tuple: its first element)."""
        v = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        return unpack(v, size) if self.packed else v


ARCHS: dict[str, Arch] = {
    "sana": Arch("sana", "SanaTransformer2DModel", "Sana", _sana),
    "pixart": Arch("pixart", "PixArtTransformer2DModel", "PixArt", _pixart),
    "sd3": Arch("sd3", "SD3Transformer2DModel", "SD3", _sd3, pooled=True),
    "flux": Arch("flux", "FluxTransformer2DModel", "FLUX", _flux, pooled=True, packed=True, timestep_scale=1.0),
}
