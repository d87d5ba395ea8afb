"""Integer ops of the FOLDED and INTEGER stages (``torch.ops.fbqc.*``) with their reference kernels.

These kernels *are* the integer semantics (DESIGN.md §3): true integer matmul with int32 accumulation,
fp32 requantization, half-to-even rounding. The ``cpu`` backend runs them; every other backend is
checked against them.

    acc  = Σ_k (xq[k] - z_x) · (wq[c, k] - z_w[c])                  int32
    y    = (float) acc * (S_x * S_w[c]) + b[c]                       fp32, S_x*S_w[c] rounded to fp32 first
    y_q  = clamp(rint(y / S_y) + z_y, 0, qmax)                      uint8 (A8) or uint16-in-int32 (A16)

Scalars (activation scales/zero points, activation bit-widths) are op attributes; scales are float32
values carried in a Python float, turned back into float32 tensors inside the kernels so no float64
arithmetic sneaks in. The ops take the activation *bits* (``x_bits``/``y_bits``: 8 or 16), never a
``qmax``: the top code and the container come from :mod:`fbqc.quant_math` (``act_qmax``,
``act_container``), which is what a backend calls too.
"""
from __future__ import annotations

import torch

from fbqc.quant_math import act_container, act_qmax

__all__ = ["quantize", "dequantize", "dequantize_weight", "qlinear", "qconv2d_1x1",
           "int_matmul", "acc_scale", "requantize"]


def _code_dtype(bits: float) -> torch.dtype:
    """Storage dtype of unsigned activation codes: uint8 for A8, int32 holding uint16 for A16."""
    return act_container(bits).dtype


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


@torch.library.custom_op("fbqc::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: float, zero_point: int, bits: float) -> torch.Tensor:
    """float → unsigned ``bits``-bit codes: ``clamp(rint(x / S) + z, 0, qmax)``, ``qmax = act_qmax(bits)``."""
    q = torch.clamp(torch.round(x.to(torch.float32) / _f32(scale)) + zero_point, 0, act_qmax(bits))
    return q.to(_code_dtype(bits))


@quantize.register_fake
def _(x, scale, zero_point, bits):
    return torch.empty(x.shape, dtype=_code_dtype(bits), device=x.device)


@torch.library.custom_op("fbqc::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """unsigned codes → float32: ``(q - z) * S``."""
    return (q.to(torch.float32) - float(zero_point)) * _f32(scale)


@dequantize.register_fake
def _(q, scale, zero_point):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("fbqc::dequantize_weight", mutates_args=())
def dequantize_weight(wq: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
                      ) -> torch.Tensor:
    """Integer weight → float32 (FOLDED stage): ``(wq - z) * S`` with S, z broadcast per channel."""
    w = wq.to(torch.float32)
    if zero_point is not None:
        w = w - zero_point.to(torch.float32)
    return w * scale


@dequantize_weight.register_fake
def _(wq, scale, zero_point):
    return torch.empty(wq.shape, dtype=torch.float32, device=wq.device)


def int_matmul(xq: torch.Tensor, x_zp: int, wq: torch.Tensor, w_zp: torch.Tensor | None
               ) -> torch.Tensor:
    """int32 accumulators ``Σ_k (xq - z_x)(wq - z_w)`` over the last dim of ``xq``; ``wq`` is (N, K, …)."""
    w = wq.reshape(wq.shape[0], -1).to(torch.int32)
    if w_zp is not None:
        w = w - w_zp.reshape(-1, 1).to(torch.int32)
    k = xq.shape[-1]
    # 2-D, row-major: torch's integer matmul is ~30x slower on strided (e.g. movedim'd NCHW) input
    x = (xq.to(torch.int32) - x_zp).reshape(-1, k).contiguous()
    return torch.matmul(x, w.t()).reshape(*xq.shape[:-1], w.shape[0])


def acc_scale(x_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    """``S_x * S_w[c]`` in float32, one value per output channel."""
    return _f32(x_scale) * w_scale.reshape(-1).to(torch.float32)


def requantize(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               y_scale: float, y_zp: int, y_bits: float) -> torch.Tensor:
    """``clamp(rint(((float)acc * scale + b) / S_y) + z_y, 0, qmax)`` with ``scale = S_x*S_w``,
    ``qmax = act_qmax(y_bits)``."""
    y = acc.to(torch.float32) * scale
    if bias is not None:
        y = y + bias
    q = torch.clamp(torch.round(y / _f32(y_scale)) + y_zp, 0, act_qmax(y_bits))
    return q.to(_code_dtype(y_bits))


@torch.library.custom_op("fbqc::qlinear", mutates_args=())
def qlinear(xq: torch.Tensor, x_scale: float, x_zp: int, wq: torch.Tensor, w_scale: torch.Tensor,
            w_zp: torch.Tensor | None, bias: torch.Tensor | None, y_scale: float, y_zp: int,
            y_bits: float) -> torch.Tensor:
    """Quantized linear over the last dim: uint8 × intN → int32 → requantized unsigned codes."""
    return requantize(int_matmul(xq, x_zp, wq, w_zp), acc_scale(x_scale, w_scale), bias, y_scale, y_zp,
                      y_bits)


@qlinear.register_fake
def _(xq, x_scale, x_zp, wq, w_scale, w_zp, bias, y_scale, y_zp, y_bits):
    return torch.empty((*xq.shape[:-1], wq.shape[0]), dtype=_code_dtype(y_bits), device=xq.device)


@torch.library.custom_op("fbqc::qconv2d_1x1", mutates_args=())
def qconv2d_1x1(xq: torch.Tensor, x_scale: float, x_zp: int, wq: torch.Tensor, w_scale: torch.Tensor,
                w_zp: torch.Tensor | None, bias: torch.Tensor | None, y_scale: float, y_zp: int,
                y_bits: float) -> torch.Tensor:
    """Quantized pointwise conv on NCHW codes: a linear over the channel dim (wq is (O, C, 1, 1))."""
    y = qlinear(xq.movedim(1, -1), x_scale, x_zp, wq, w_scale, w_zp, bias, y_scale, y_zp, y_bits)
    return y.movedim(-1, 1).contiguous()


@qconv2d_1x1.register_fake
def _(xq, x_scale, x_zp, wq, w_scale, w_zp, bias, y_scale, y_zp, y_bits):
    n, _, *spatial = xq.shape
    return torch.empty((n, wq.shape[0], *spatial), dtype=_code_dtype(y_bits), device=xq.device)
