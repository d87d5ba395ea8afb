"""Fractional fake quantization as registered custom ops (``torch.ops.fbqc.*``).

The bit-width is a *tensor* input (a 0-d float32 buffer in the graph), so the QAT schedule changes it
by writing the buffer: no re-export, and ``torch.compile`` sees one opaque op that it does not
specialise on the value. Gradients are straight-through (weights) and clipped straight-through
(activations: zero where the input fell outside the grid).

The formulas are :mod:`fbqc.quant_math`'s (``narrow_qmax_t``, ``narrow_levels_t``, ``sym_scale_t``,
``wide_qmax_t``, ``asym_qparams_t``); written out:

Weights, narrow range (symmetric, signed), per output channel along ``axis`` (``None``: per tensor)::

    qmax = 2**(b-1) - 1          (float64, rounded once to float32)
    S    = max|W| / qmax         (S = 1 where a channel is all zero)
    Q    = clamp(round(W / S), -floor(qmax) - 1, floor(qmax))      → W' = Q * S

Weights, wide range (asymmetric), with an integer zero point so the integer lowering is exact; the
range [min(min W, 0), max(max W, 0)] always holds 0 (as for activations)::

    S = (wmax - wmin) / 2**b,  z = clamp(round(-wmin / S), 0, L - 1),  L = floor(2**b)
    Q = clamp(round(W / S) + z, 0, L - 1)                           → W' = (Q - z) * S

Activations, unsigned asymmetric per tensor with calibrated (or learned) scale and zero point::

    Q = clamp(round(x / S) + z, 0, floor(2**b) - 1)                 → x' = (Q - z) * S

Rounding is half-to-even (``torch.round``) everywhere.
"""
from __future__ import annotations

import torch

from fbqc.quant_math import (asym_qparams_t, clamp0, narrow_levels_t, narrow_qmax_t, sym_scale_t, wide_bound_t,
                             wide_qmax_t)

__all__ = ["weight_codes", "act_codes", "weight_value", "act_value", "act_inside", "fake_quant_weight",
           "fake_quant_act"]


def _reduce_dims(w: torch.Tensor, axis: int | None) -> list[int]:
    if axis is None:
        return list(range(w.dim()))
    axis = axis % w.dim()
    return [d for d in range(w.dim()) if d != axis]


def weight_codes(w: torch.Tensor, bits: torch.Tensor, axis: int | None = 0, scheme: str = "narrow"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes (as float32), scale and zero point of ``w``; shapes of S and z broadcast to ``w``."""
    w = w.detach().to(torch.float32)
    dims = _reduce_dims(w, axis)
    if scheme == "narrow":
        scale = sym_scale_t(w.abs().amax(dim=dims, keepdim=True), narrow_qmax_t(bits))
        q = torch.clamp(torch.round(w / scale), *narrow_levels_t(bits))
        return q, scale, torch.zeros_like(scale)
    if scheme == "wide":
        qmax = wide_qmax_t(bits)
        # the range holds 0, so a one-signed channel does not collapse to one level
        scale, zp = asym_qparams_t(w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True), qmax,
                                   steps=wide_bound_t(bits))
        q = clamp0(torch.round(w / scale) + zp, qmax)
        return q, scale, zp
    raise ValueError(f"unknown weight scheme {scheme!r} (expected 'narrow' or 'wide')")


def act_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: torch.Tensor
              ) -> torch.Tensor:
    """Unsigned activation codes (as float32) of ``x``."""
    return clamp0(torch.round(x.to(torch.float32) / scale) + zero_point, wide_qmax_t(bits))


def weight_value(w: torch.Tensor, bits: torch.Tensor, axis: int | None = 0, scheme: str = "narrow"
                 ) -> torch.Tensor:
    """The fake-quantized weight ``(Q - z) * S`` in ``w``'s dtype (the ops' forward, and the fused path's)."""
    q, scale, zp = weight_codes(w, bits, axis, scheme)
    return ((q - zp) * scale).to(w.dtype)


def act_value(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: torch.Tensor
              ) -> torch.Tensor:
    """The fake-quantized activation ``(Q - z) * S`` in ``x``'s dtype."""
    return ((act_codes(x, scale, zero_point, bits) - zero_point) * scale).to(x.dtype)


def act_inside(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: torch.Tensor
               ) -> torch.Tensor:
    """Where ``x`` fell inside the grid (the clipped straight-through gradient's mask)."""
    pre = torch.round(x.detach().to(torch.float32) / scale) + zero_point
    return (pre >= 0) & (pre <= wide_qmax_t(bits))


# --- fbqc::fake_quant_weight ---------------------------------------------------------------------

@torch.library.custom_op("fbqc::fake_quant_weight", mutates_args=())
def fake_quant_weight(w: torch.Tensor, bits: torch.Tensor, axis: int | None = 0,
                      scheme: str = "narrow") -> torch.Tensor:
    """Fake-quantize a weight to ``bits`` (fractional allowed) per channel along ``axis``."""
    return weight_value(w, bits, axis, scheme)


@fake_quant_weight.register_fake
def _(w, bits, axis=0, scheme="narrow"):
    return torch.empty_like(w)


def _fqw_setup(ctx, inputs, output):
    pass


def _fqw_backward(ctx, grad):
    return grad, None, None, None


fake_quant_weight.register_autograd(_fqw_backward, setup_context=_fqw_setup)


# --- fbqc::fake_quant_act ------------------------------------------------------------------------

@torch.library.custom_op("fbqc::fake_quant_act", mutates_args=())
def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   bits: torch.Tensor) -> torch.Tensor:
    """Fake-quantize an activation to unsigned ``bits`` with a per-tensor scale and zero point."""
    return act_value(x, scale, zero_point, bits)


@fake_quant_act.register_fake
def _(x, scale, zero_point, bits):
    return torch.empty_like(x)


def _fqa_setup(ctx, inputs, output):
    ctx.save_for_backward(act_inside(*inputs))


def _fqa_backward(ctx, grad):
    (inside,) = ctx.saved_tensors
    return grad * inside.to(grad.dtype), None, None, None


fake_quant_act.register_autograd(_fqa_backward, setup_context=_fqa_setup)
