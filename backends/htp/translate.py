"""onnxscript translations of the ``fbqc_htp`` ops: the QDQ patterns the QNN EP maps to one HTP op.

Linear (x of any rank, flattened to 2-D around a Gemm, the form the QNN EP maps to FullyConnected)::

    x ─Reshape(-1, K)─QuantizeLinear(S_x, z_x)─DequantizeLinear(S_x, z_x)─┐
    W (K, N) int4|int8 ─DequantizeLinear(S_w, 0, axis=1)──────────────────┤
    b int32 (S_x·S_w, 0) ─DequantizeLinear(axis=0)────────────────── Gemm ─QuantizeLinear(S_y, z_y)
        ─DequantizeLinear(S_y, z_y)─Reshape(…, N)

Pointwise conv: the same with ``Conv`` on NCHW and the weight (O, C, 1, 1) dequantized along axis 0.
Activation codes are uint8 (A8) or uint16 (A16); the weight zero point is an explicit all-zero tensor
of the weight's type (the HTP simulator gives wrong numbers for an INT4 DequantizeLinear without one).
Weights arrive as int8 initializers and are retyped to INT4 after the export (:mod:`.onnx_fixes`).
The bias is added in the accumulator, quantized to int32 at scale S_x·S_w (what the HTP does).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset21 as op

from fbqc.quant_math import act_container

__all__ = ["qdq_linear", "qdq_conv1x1", "TRANSLATIONS"]


def _const(value: np.ndarray):
    return op.Constant(value=ir.tensor(value))


def _act(x_scale: float, x_zp: int, x_bits: float):
    zp_type = np.uint8 if act_container(x_bits).bits <= 8 else np.uint16     # A8 | A16 codes
    return _const(np.array(x_scale, dtype=np.float32)), _const(np.array(x_zp, dtype=zp_type))


def _qdq(x, scale, zp):
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)


def qdq_linear(x, w_kn, w_scale, w_zero, bias, bias_q, bias_scale, x_scale: float, x_zp: int,
               x_bits: float, y_scale: float, y_zp: int, y_bits: float):
    k, n = w_kn.shape
    lead = list(x.shape)[:-1]
    xs, xz = _act(x_scale, x_zp, x_bits)
    ys, yz = _act(y_scale, y_zp, y_bits)
    x2 = op.Reshape(x, _const(np.array([-1, k], dtype=np.int64))) if len(lead) != 1 else x
    w = op.DequantizeLinear(w_kn, w_scale, w_zero, axis=1)
    xd = _qdq(x2, xs, xz)
    if bias_q is not None:
        zero = _const(np.zeros(n, dtype=np.int32))
        y = op.Gemm(xd, w, op.DequantizeLinear(bias_q, bias_scale, zero, axis=0))
    else:
        y = op.Gemm(xd, w)
    y = _qdq(y, ys, yz)
    return op.Reshape(y, _const(np.array([*lead, n], dtype=np.int64))) if len(lead) != 1 else y


def qdq_conv1x1(x, w, w_scale, w_zero, bias, bias_q, bias_scale, x_scale: float, x_zp: int,
                x_bits: float, y_scale: float, y_zp: int, y_bits: float):
    xs, xz = _act(x_scale, x_zp, x_bits)
    ys, yz = _act(y_scale, y_zp, y_bits)
    wd = op.DequantizeLinear(w, w_scale, w_zero, axis=0)
    xd = _qdq(x, xs, xz)
    if bias_q is not None:
        zero = _const(np.zeros(w.shape[0], dtype=np.int32))
        y = op.Conv(xd, wd, op.DequantizeLinear(bias_q, bias_scale, zero, axis=0))
    else:
        y = op.Conv(xd, wd)
    return _qdq(y, ys, yz)


def translations() -> dict:
    import torch

    from . import ops  # noqa: F401

    return {torch.ops.fbqc_htp.qdq_linear.default: qdq_linear,
            torch.ops.fbqc_htp.qdq_conv1x1.default: qdq_conv1x1}


TRANSLATIONS = translations
