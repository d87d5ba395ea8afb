"""fbqc's op library: every ``torch.ops.fbqc.*`` op and the kernels behind them, one file per family.

=====================  =================================================  ==============================
module                 ops / functions                                    used by
=====================  =================================================  ==============================
:mod:`.fake_quant`     ``fbqc::fake_quant_weight``, ``fake_quant_act``     FAKE_QUANT (InsertFakeQuant,
                       (static scales), their values :func:`weight_value`, Calibrate, QAT); Fold
                       :func:`act_value` and codes :func:`weight_codes`,    (weight codes); agreement
                       :func:`act_codes`                                   (reference input codes)
:mod:`.dynamic`        ``fbqc::fake_quant_act_dynamic``: per-sample        QAT training view only
                       dynamic activation scale/zero point
:mod:`.fused`          :func:`fq_weight`, :func:`fq_act`,                  QAT under ``torch.compile``
                       :func:`fq_act_dynamic`: the same values as the      (inductor fuses them)
                       three ops above, traceable by dynamo
:mod:`.integer`        ``fbqc::dequantize_weight`` (FOLDED),               FOLDED, INTEGER; the ``cpu``
                       ``fbqc::quantize``, ``dequantize``, ``qlinear``,    backend runs them, every other
                       ``qconv2d_1x1`` (INTEGER) and the reference kernels backend is checked against them
=====================  =================================================  ==============================

The level and quantization-parameter formulas all of them use live in :mod:`fbqc.quant_math` (and only
there). Importing :mod:`fbqc.ops` (``import fbqc`` does) registers every op.
"""
from . import dynamic, fake_quant, fused, integer

__all__ = ["fake_quant", "dynamic", "fused", "integer"]
