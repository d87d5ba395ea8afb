"""``fbqc::fake_quant_act_dynamic``: per-sample dynamic activation fake quant (the paper's GPU setting).

Unsigned asymmetric, one (scale, zero point) per sample along dim 0, computed from that sample's own
range (which always holds 0), with the same level set and rounding as :func:`fbqc.ops.fake_quant.act_codes`
(the formulas are :func:`fbqc.quant_math.asym_qparams_t` and :func:`~fbqc.quant_math.wide_qmax_t`)::

    lo, hi = min(min x_i, 0), max(max x_i, 0)       per sample i
    qmax   = floor(2**b) - 1;  S = (hi - lo) / qmax (S = 1 where hi == lo)
    z      = clamp(round(-lo / S), 0, qmax);  Q = clamp(round(x / S) + z, 0, qmax)  → x' = (Q - z) * S

Used only while training (the student's training view); before export the static scales are
calibrated by the ``Calibrate`` pass. The gradient is straight-through (no element is clipped: the
range is the sample's own).
"""
from __future__ import annotations

import torch

from fbqc.quant_math import asym_qparams_t, wide_qmax_t

from .fake_quant import act_value

__all__ = ["fake_quant_act_dynamic", "dynamic_act_qparams", "dynamic_act_value", "memory_order"]


def memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` with dims 1… permuted into memory order (strides descending): a per-sample reduction
    over it has the same value, but compiled it reads each sample contiguously. Reduced in logical
    order, a channels-last conv output (Sana's GLUMBConv) is read with stride C: 4× slower on an H200."""
    order = sorted(range(1, x.dim()), key=lambda d: -x.stride(d))
    return x.permute(0, *order)


def dynamic_act_qparams(x: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (scale, zero point), shaped (B, 1, …, 1) to broadcast against ``x``."""
    x = memory_order(x.detach()).to(torch.float32)
    dims = list(range(1, x.dim()))
    shape = (x.shape[0],) + (1,) * len(dims)
    lo = x.amin(dim=dims).reshape(shape) if dims else x
    hi = x.amax(dim=dims).reshape(shape) if dims else x
    return asym_qparams_t(lo, hi, wide_qmax_t(bits))


def dynamic_act_value(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``x`` fake-quantized with its per-sample dynamic (scale, zero point), in ``x``'s dtype."""
    return act_value(x, *dynamic_act_qparams(x, bits), bits)


@torch.library.custom_op("fbqc::fake_quant_act_dynamic", mutates_args=())
def fake_quant_act_dynamic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``x`` to unsigned ``bits`` with per-sample dynamic scale and zero point."""
    return dynamic_act_value(x, bits)


@fake_quant_act_dynamic.register_fake
def _(x, bits):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    return grad, None


fake_quant_act_dynamic.register_autograd(_backward, setup_context=_setup)
