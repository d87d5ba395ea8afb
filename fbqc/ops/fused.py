"""Fusible fake quant for training: the fbqc ops' math as ``torch.autograd.Function``s.

The registered ops (``fbqc::fake_quant_weight``, ``fake_quant_act``, ``fake_quant_act_dynamic``) are
opaque to ``torch.compile``: inductor calls them as fallback kernels, each materialising fp32 copies
(the straightforward fake quant that costs 1.3–1.5× a compiled step). The functions here compute the
*same* values with the same code (:func:`fbqc.ops.fake_quant.weight_value`, :func:`~fbqc.ops.fake_quant.act_value`,
:func:`fbqc.ops.dynamic.dynamic_act_value`) but dynamo traces through them, so inductor fuses the
per-channel max-reduce, round and clamp into the surrounding kernels (the weight's bf16 cast, the
norm before an activation) — Triton on CUDA, C++ on CPU. Backward is the straight-through estimator
(clipped to the grid for static activation scales, the mask recomputed from ``x`` instead of stored).

The bit-width stays a tensor input: a schedule that writes it causes no recompilation.
"""
from __future__ import annotations

import torch

from .dynamic import dynamic_act_value
from .fake_quant import act_inside, act_value, weight_value

__all__ = ["fq_weight", "fq_act", "fq_act_dynamic", "compile_options"]


def compile_options(cuda_graphs: bool = False) -> dict:
    """``torch.compile`` options that keep the fused kernels bit-identical to the ops: Triton's
    ``x / y`` is approximate (``div.full.f32``) and moves ``round(w / S)`` across rounding boundaries;
    IEEE division (``div.rn``) is what eager computes. Empty where inductor lacks the switch.

    ``cuda_graphs``: each compiled graph is replayed as a CUDA graph (``triton.cudagraphs``, inductor's
    cudagraph trees): a step's kernels cost no CPU launch time; the caller marks each step's start
    (``torch.compiler.cudagraph_mark_step_begin``)."""
    try:
        from torch._inductor import config
    except ImportError:                               # pragma: no cover - torch without inductor
        return {}
    numerics = getattr(config, "eager_numerics", None)
    return {**({"eager_numerics.division_rounding": True} if hasattr(numerics, "division_rounding") else {}),
            **({"triton.cudagraphs": True} if cuda_graphs else {})}


class _StraightThrough(torch.autograd.Function):
    """The straight-through estimator: the gradient passes to the first input unchanged (none to the
    others); a subclass gives the forward."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.rest = len(inputs) - 1

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + (None,) * ctx.rest


class _Weight(_StraightThrough):
    @staticmethod
    def forward(w, bits, axis, scheme):
        return weight_value(w, bits, axis, scheme)


class _ActDynamic(_StraightThrough):
    @staticmethod
    def forward(x, bits):
        return dynamic_act_value(x, bits)


class _ActStatic(torch.autograd.Function):
    @staticmethod
    def forward(x, scale, zero_point, bits):
        return act_value(x, scale, zero_point, bits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point, bits = ctx.saved_tensors
        return grad * act_inside(x, scale, zero_point, bits).to(grad.dtype), None, None, None


def fq_weight(w: torch.Tensor, bits: torch.Tensor, axis: int | None = 0, scheme: str = "narrow") -> torch.Tensor:
    """Same values as ``torch.ops.fbqc.fake_quant_weight``; straight-through gradient."""
    return _Weight.apply(w, bits, axis, scheme)


def fq_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Same values as ``torch.ops.fbqc.fake_quant_act``; gradient zero where ``x`` left the grid."""
    return _ActStatic.apply(x, scale, zero_point, bits)


def fq_act_dynamic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Same values as ``torch.ops.fbqc.fake_quant_act_dynamic``; straight-through gradient."""
    return _ActDynamic.apply(x, bits)
