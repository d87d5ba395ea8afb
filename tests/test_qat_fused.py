"""fbqc.ops.fused: the fusible fake quant computes the registered ops' values and gradients exactly —
eagerly and compiled by inductor (C++ here; Triton on the GPU, checked by benchmarks/gpu_qat_step.py) —
and a bit-width change recompiles nothing."""
from __future__ import annotations

import pytest
import torch

import fbqc.qat  # noqa: F401  registers the ops
from fbqc.ops.fused import compile_options, fq_act, fq_act_dynamic, fq_weight
from test_qat_toy import one_thread

fbqc = torch.ops.fbqc
BITS = (8.0, 7.0, 5.5, 4.75, 4.5, 4.25, 4.0, 3.25)


def _weight(seed=0, shape=(24, 40)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g)
    w[3] = w[3].abs()                          # a one-signed channel (wide range must hold 0)
    w[5] = 0.0                                 # an all-zero channel (scale 1)
    return w


def _act(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 16, 40, generator=g) * 2 + 0.3
    x[1] = x[1].abs()                          # a one-signed sample
    return x.to(dtype)


def _bits(b):
    return torch.tensor(b, dtype=torch.float64)


@pytest.mark.parametrize("scheme", ["narrow", "wide"])
@pytest.mark.parametrize("axis", [0, None])
def test_weight_matches_op_values_and_grad(scheme, axis):
    w0 = _weight()
    for b in BITS:
        w1, w2 = w0.clone().requires_grad_(), w0.clone().requires_grad_()
        ref = fbqc.fake_quant_weight(w1, _bits(b), axis, scheme)
        out = fq_weight(w2, _bits(b), axis, scheme)
        assert torch.equal(out, ref), b
        g = torch.randn_like(ref)
        ref.backward(g)
        out.backward(g)
        assert torch.equal(w2.grad, w1.grad) and torch.equal(w2.grad, g)          # straight through


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_matches_ops(dtype):
    x0 = _act(dtype=dtype)
    scale, zp = torch.tensor(0.02), torch.tensor(97.0)           # a static grid that clips some of x
    for b in (8.0, 16.0, 5.5):
        x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        ref, out = fbqc.fake_quant_act_dynamic(x1, _bits(b)), fq_act_dynamic(x2, _bits(b))
        assert out.dtype == dtype and torch.equal(out, ref)
        ref.sum().backward()
        out.sum().backward()
        assert torch.equal(x1.grad, x2.grad)
        x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        ref, out = fbqc.fake_quant_act(x1, scale, zp, _bits(b)), fq_act(x2, scale, zp, _bits(b))
        assert torch.equal(out, ref)
        g = torch.randn(ref.shape).to(dtype)
        ref.backward(g)
        out.backward(g)
        assert torch.equal(x1.grad, x2.grad)
        clipped = int((x1.grad == 0).sum())
        assert 0 < clipped < x0.numel()          # the clipped STE masks some, not all, elements


def test_compiled_fused_is_exact_and_compiles_once():
    """Inductor-compiled fused fake quant (a linear layer with W / A-in / A-out quantizers) equals the
    eager ops for every bit-width of the fractional schedule, forward and backward, and the bit-width
    buffer change triggers no recompilation."""
    torch._dynamo.reset()
    w0, x0 = _weight(2, (16, 40)), _act(3)
    bits = _bits(8.0)

    def layer(fq_w, fq_a, w, x, b):
        return fq_a(torch.nn.functional.linear(fq_a(x, b), fq_w(w, b, 0, "narrow")), b)

    compiled = torch.compile(lambda w, x, b: layer(fq_weight, fq_act_dynamic, w, x, b), options=compile_options())
    graphs = None
    with one_thread():
        for b in (8.0, 7.0, 5.5, 4.75, 4.0):
            bits.fill_(b)
            w1, x1 = w0.clone().requires_grad_(), x0.clone().requires_grad_()
            w2, x2 = w0.clone().requires_grad_(), x0.clone().requires_grad_()
            out = compiled(w1, x1, bits)
            ref = layer(fbqc.fake_quant_weight, fbqc.fake_quant_act_dynamic, w2, x2, bits)
            assert torch.equal(out, ref), b
            out.square().sum().backward()
            ref.square().sum().backward()
            assert torch.allclose(w1.grad, w2.grad, rtol=1e-5, atol=1e-6), b     # matmul order may differ
            assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-6), b
            n = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            graphs = n if graphs is None else graphs
            assert n == graphs, f"recompiled at {b} bits"
    assert not torch.equal(fq_weight(w0, _bits(8.0)), fq_weight(w0, _bits(4.0)))   # the bits took effect


def test_compile_options_request_ieee_division():
    opts = compile_options()
    from torch._inductor import config

    if hasattr(getattr(config, "eager_numerics", None), "division_rounding"):
        assert opts == {"eager_numerics.division_rounding": True}
    else:
        assert opts == {}
