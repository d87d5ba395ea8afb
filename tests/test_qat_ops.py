"""``fbqc::fake_quant_act_dynamic`` (per-sample dynamic activation quant) against NumPy, and its grad."""
from __future__ import annotations

import numpy as np
import torch

import fbqc.qat  # noqa: F401  registers torch.ops.fbqc.fake_quant_act_dynamic

FQD = torch.ops.fbqc.fake_quant_act_dynamic
F32 = np.float32


def np_dynamic(x: np.ndarray, bits: float) -> np.ndarray:
    """Per sample i: range [min(min x_i, 0), max(max x_i, 0)] on floor(2**b) levels, rint half-even."""
    qmax = F32(np.floor(F32(2.0 ** bits)) - F32(1))
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        lo, hi = F32(min(x[i].min(), 0)), F32(max(x[i].max(), 0))
        s = F32((hi - lo) / qmax) if hi != lo else F32(1)
        z = np.clip(np.rint(-lo / s), 0, qmax).astype(F32)
        q = np.clip(np.rint(x[i] / s) + z, 0, qmax).astype(F32)
        out[i] = (q - z) * s
    return out


def test_dynamic_matches_numpy_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g) * torch.tensor([0.1, 1.0, 30.0, 2.0]).view(4, 1, 1)
    x[3] = x[3].abs() + 1.0                                  # one-signed sample: range still holds 0
    for bits in (8, 6, 4.5):
        got = FQD(x, torch.tensor(float(bits), dtype=torch.float64))
        assert torch.equal(got, torch.from_numpy(np_dynamic(x.numpy(), bits))), bits
    # 8 bits: at most 256 distinct values per sample, the sample's max error ≤ half a step
    y = FQD(x, torch.tensor(8.0))
    for i in range(4):
        assert len(torch.unique(y[i])) <= 256
        step = (max(float(x[i].max()), 0) - min(float(x[i].min()), 0)) / 255
        assert float((y[i] - x[i]).abs().max()) <= step / 2 + 1e-6
    # samples are independent: scaling one sample leaves the others' codes alone
    x2 = x.clone()
    x2[0] *= 100
    assert torch.equal(FQD(x2, torch.tensor(8.0))[1:], y[1:])


def test_dynamic_zero_sample_bf16_and_straight_through_grad():
    x = torch.zeros(2, 3)
    assert torch.equal(FQD(x, torch.tensor(8.0)), x)
    xb = torch.randn(2, 8).to(torch.bfloat16)
    assert FQD(xb, torch.tensor(8.0)).dtype == torch.bfloat16
    x = torch.randn(3, 7, requires_grad=True)
    g = torch.randn(3, 7)
    FQD(x, torch.tensor(4.0)).backward(g)
    assert torch.equal(x.grad, g)


def test_dynamic_channels_last_and_permuted_inputs():
    """The range is reduced in memory order (fast when compiled): the values must not depend on the
    layout — a channels-last conv output and a permuted view give NumPy's per-sample result."""
    from fbqc.ops.dynamic import memory_order
    from fbqc.ops.fused import compile_options, fq_act_dynamic

    g = torch.Generator().manual_seed(3)
    nhwc = torch.randn(3, 5, 4, 7, generator=g) * torch.tensor([0.5, 4.0, 20.0]).view(3, 1, 1, 1)
    x = nhwc.permute(0, 3, 1, 2)                              # (3, 7, 5, 4), channels-last memory
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert memory_order(x).is_contiguous() and memory_order(x.contiguous()).shape == x.shape
    want = torch.from_numpy(np_dynamic(x.contiguous().numpy(), 6.0))
    bits = torch.tensor(6.0, dtype=torch.float64)
    assert torch.equal(FQD(x, bits), want)
    assert torch.equal(FQD(x.transpose(1, 3), bits), want.transpose(1, 3))
    compiled = torch.compile(fq_act_dynamic, options=compile_options())
    assert torch.equal(compiled(x, bits), want)
