"""The two ops of the HTP lowering: a whole quantized layer, float in → float out.

``fbqc::quantize → fbqc::qlinear → fbqc::dequantize`` (INTEGER stage) becomes one
``fbqc_htp::qdq_linear`` whose ONNX translation is the QDQ pattern the QNN EP maps onto one HTP op:

    x ─QuantizeLinear─DequantizeLinear─┐
    Wq (K, N) int4/int8 ─DequantizeLinear(axis=1, zero point 0)─ MatMul ─(+ bias)─ QuantizeLinear ─ DequantizeLinear

Keeping the codes inside the op means every tensor between ops is float32 in torch and in ONNX (the
A16 codes, int32 in torch, are uint16 in ONNX: they never cross a torch/ONNX type boundary). The eager
kernels call the reference integer ops, so the prepared program computes exactly what the INTEGER
program computes (checked by the tests).
"""
from __future__ import annotations

import torch

from fbqc.ops import integer as int_ops

__all__ = ["qdq_linear", "qdq_conv1x1"]


@torch.library.custom_op("fbqc_htp::qdq_linear", mutates_args=())
def qdq_linear(x: torch.Tensor, w_kn: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
               bias: torch.Tensor | None, bias_q: torch.Tensor | None, bias_scale: torch.Tensor | None,
               x_scale: float, x_zp: int, x_bits: float, y_scale: float, y_zp: int, y_bits: float
               ) -> torch.Tensor:
    """``dequantize(qlinear(quantize(x)))`` with the weight stored (K, N) (``w_zero`` is all 0).

    ``bias_q``/``bias_scale`` (the bias as int32 at scale S_x·S_w) are what the ONNX form adds to the
    accumulator; the eager kernel follows the contract (fp32 bias after the scaling).
    """
    xq = int_ops.quantize(x, x_scale, x_zp, x_bits)
    yq = int_ops.qlinear(xq, x_scale, x_zp, w_kn.t(), w_scale, None, bias, y_scale, y_zp, y_bits)
    return int_ops.dequantize(yq, y_scale, y_zp)


@qdq_linear.register_fake
def _(x, w_kn, w_scale, w_zero, bias, bias_q, bias_scale, x_scale, x_zp, x_bits, y_scale, y_zp, y_bits):
    return torch.empty((*x.shape[:-1], w_kn.shape[1]), dtype=torch.float32, device=x.device)


@torch.library.custom_op("fbqc_htp::qdq_conv1x1", mutates_args=())
def qdq_conv1x1(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                bias: torch.Tensor | None, bias_q: torch.Tensor | None, bias_scale: torch.Tensor | None,
                x_scale: float, x_zp: int, x_bits: float, y_scale: float, y_zp: int, y_bits: float
                ) -> torch.Tensor:
    """``dequantize(qconv2d_1x1(quantize(x)))`` on NCHW, weight (O, C, 1, 1), per-channel axis 0."""
    xq = int_ops.quantize(x, x_scale, x_zp, x_bits)
    yq = int_ops.qconv2d_1x1(xq, x_scale, x_zp, w, w_scale, None, bias, y_scale, y_zp, y_bits)
    return int_ops.dequantize(yq, y_scale, y_zp)


@qdq_conv1x1.register_fake
def _(x, w, w_scale, w_zero, bias, bias_q, bias_scale, x_scale, x_zp, x_bits, y_scale, y_zp, y_bits):
    n, _, *spatial = x.shape
    return torch.empty((n, w.shape[0], *spatial), dtype=torch.float32, device=x.device)
