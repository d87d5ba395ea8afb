"""Integer ops (``torch.ops.fbqc.quantize / dequantize / dequantize_weight / qlinear / qconv2d_1x1``)
against NumPy integer arithmetic and the DESIGN.md §3 requantization, written again here:

    acc = Σ_k (xq - z_x)(wq - z_w[c])            np.int64, then checked to fit int32
    y   = float32(acc) * float32(S_x * S_w[c]) + b[c]     (product rounded to fp32 first)
    y_q = clamp(rint(y / S_y) + z_y, 0, qmax)   fp32, half-to-even; uint8 (A8) or int32 (A16)

All comparisons are exact.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import fbqc  # noqa: F401  registers torch.ops.fbqc.*

F32 = np.float32
OPS = torch.ops.fbqc
I32 = np.iinfo(np.int32)
#: the ops take activation bits; the cases below are written with the top code they imply
BITS = {255: 8.0, 65535: 16.0}


# --- independent NumPy reference ------------------------------------------------------------------

def np_code_dtype(qmax: int):
    return np.uint8 if qmax <= 255 else np.int32


def np_quantize(x, scale, zp, qmax):
    q = np.rint(x.astype(F32) / F32(scale)) + F32(zp)
    return np.clip(q, F32(0), F32(qmax)).astype(np_code_dtype(qmax))


def np_dequantize(q, scale, zp):
    return ((q.astype(F32) - F32(zp)) * F32(scale)).astype(F32)


def np_acc(xq, x_zp, wq, w_zp):
    """Exact int64 accumulators over the last dim of xq; wq is (O, K, …)."""
    w = wq.reshape(wq.shape[0], -1).astype(np.int64)
    if w_zp is not None:
        w = w - w_zp.reshape(-1, 1).astype(np.int64)
    x = xq.astype(np.int64) - np.int64(x_zp)
    acc = x @ w.T
    assert acc.min() >= I32.min and acc.max() <= I32.max, "test input overflows int32"
    return acc


def np_requant(acc, x_scale, w_scale, bias, y_scale, y_zp, y_qmax):
    s = (F32(x_scale) * w_scale.reshape(-1).astype(F32)).astype(F32)   # S_x*S_w[c] in fp32
    y = acc.astype(F32) * s
    if bias is not None:
        y = y + bias.astype(F32)
    assert y.dtype == np.float32
    q = np.rint(y / F32(y_scale)) + F32(y_zp)
    return np.clip(q, F32(0), F32(y_qmax)).astype(np_code_dtype(y_qmax))


def np_qlinear(xq, x_scale, x_zp, wq, w_scale, w_zp, bias, y_scale, y_zp, y_qmax):
    return np_requant(np_acc(xq, x_zp, wq, w_zp), x_scale, w_scale, bias, y_scale, y_zp, y_qmax)


def t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a).copy())


# --- weights of each kind -------------------------------------------------------------------------

# kind: (storage dtype, lo, hi, has zero point)
WEIGHT_KINDS = {
    "int4": (np.int8, -8, 7, False),       # int4 range in int8 storage
    "int4.5": (np.int8, -11, 10, False),   # fractional narrow grid (4.5 bits)
    "int8": (np.int8, -128, 127, False),
    "wide4": (np.uint8, 0, 15, True),      # asymmetric, per-channel integer zero point
    "wide8": (np.uint8, 0, 255, True),
}


def make_weight(kind: str, o: int, k: int, rng):
    dt, lo, hi, has_zp = WEIGHT_KINDS[kind]
    wq = rng.integers(lo, hi + 1, size=(o, k)).astype(dt)
    wq[0, :2] = [lo, hi]                                  # extremes present
    w_scale = (rng.uniform(0.5, 2.0, size=(o, 1)) * 10.0 ** rng.integers(-3, 0, size=(o, 1))
               ).astype(F32)
    w_zp = rng.integers(lo, hi + 1, size=(o,)).astype(np.int32) if has_zp else None
    if has_zp:
        w_zp[0] = lo
        w_zp[-1] = hi
    return wq, w_scale, w_zp


def out_qparams(acc_ref_y: np.ndarray, y_qmax: int, rng):
    """An output quantizer covering ~80 % of the float range, so both ends clamp a little."""
    lo, hi = float(acc_ref_y.min()), float(acc_ref_y.max())
    y_scale = float(F32((hi - lo) / (1.25 * y_qmax)))
    y_zp = int(np.clip(round(-lo / y_scale - 0.125 * y_qmax), 0, y_qmax))
    return y_scale, y_zp


def layer_case(kind, y_qmax, with_bias, x_shape, seed):
    rng = np.random.default_rng(seed)
    k = x_shape[-1]
    o = 6
    wq, w_scale, w_zp = make_weight(kind, o, k, rng)
    x_qmax = 255
    xq = rng.integers(0, x_qmax + 1, size=x_shape).astype(np.uint8)
    xq.reshape(-1, k)[0, :2] = [0, 255]
    x_scale = float(F32(rng.uniform(0.005, 0.05)))
    x_zp = int(rng.integers(0, 256))
    bias = rng.standard_normal(o).astype(F32) * F32(5.0) if with_bias else None
    # float outputs to place the output quantizer
    acc = np_acc(xq, x_zp, wq, w_zp)
    y = acc.astype(F32) * (F32(x_scale) * w_scale.reshape(-1)) + (0 if bias is None else bias)
    y_scale, y_zp = out_qparams(y, y_qmax, rng)
    return dict(xq=xq, x_scale=x_scale, x_zp=x_zp, wq=wq, w_scale=w_scale, w_zp=w_zp, bias=bias,
                y_scale=y_scale, y_zp=y_zp, y_qmax=y_qmax)


_SAME = object()


def call(op, c, xq=None, wq=None, w_scale=None, w_zp=_SAME):
    return op(t(c["xq"] if xq is None else xq), c["x_scale"], c["x_zp"],
              t(c["wq"] if wq is None else wq), t(c["w_scale"] if w_scale is None else w_scale),
              t(c["w_zp"]) if w_zp is _SAME else t(w_zp), t(c["bias"]), c["y_scale"], c["y_zp"],
              BITS[c["y_qmax"]])


# --- quantize / dequantize ------------------------------------------------------------------------

Q_CASES = [  # (scale, zero point, qmax)
    (0.05, 128, 255),
    (0.0123, 3, 255),
    (0.25, 0, 255),            # power of two: exact ties
    (3e-4, 30000, 65535),
    (2.0 ** -10, 32768, 65535),
]


def q_inputs(scale, zp, qmax, seed):
    rng = np.random.default_rng(seed)
    lo, hi = -zp * scale, (qmax - zp) * scale
    span = hi - lo
    x = rng.uniform(lo - 0.3 * span, hi + 0.3 * span, 3000).astype(F32)
    s = F32(scale)
    ties = []   # x with float32 x / S exactly k + .5
    for centre in (0, qmax):
        for k in range(-4, 5):
            code = centre - zp + k + 0.5
            c = F32(np.float64(s) * code)
            for _ in range(8):
                if F32(c / s) == F32(code):
                    ties.append(c)
                    break
                c = np.nextafter(c, F32(np.inf if F32(c / s) < code else -np.inf))
    extreme = np.array([0.0, -0.0, lo, hi, 1e6, -1e6, 1e30, -1e30, np.inf, -np.inf], F32)
    return np.concatenate([x, np.array(ties, F32), extreme]), np.array(ties, F32)


@pytest.mark.parametrize("scale,zp,qmax", Q_CASES)
@pytest.mark.parametrize("in_dtype", [np.float32, np.float64])
def test_quantize(scale, zp, qmax, in_dtype):
    x, ties = q_inputs(scale, zp, qmax, seed=1)
    x = x.astype(in_dtype)
    got = OPS.quantize(t(x), scale, zp, BITS[qmax])
    assert got.dtype == (torch.uint8 if qmax == 255 else torch.int32)
    got = got.numpy()
    want = np_quantize(x, scale, zp, qmax)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert got.min() == 0 and got.max() == qmax                # clamped both ends
    assert len(ties) >= 9
    # ties: Python's round() (half-to-even) as an independent scalar check
    got_t = OPS.quantize(t(ties), scale, zp, BITS[qmax]).numpy().astype(np.int64)
    want_t = [min(max(round(float(F32(v / F32(scale)))) + zp, 0), qmax) for v in ties]
    assert got_t.tolist() == want_t


@pytest.mark.parametrize("scale,zp,qmax", Q_CASES)
def test_dequantize(scale, zp, qmax):
    rng = np.random.default_rng(2)
    q = rng.integers(0, qmax + 1, size=(3, 7, 11)).astype(np_code_dtype(qmax))
    q.flat[:2] = [0, qmax]
    got = OPS.dequantize(t(q), scale, zp)
    assert got.dtype == torch.float32 and tuple(got.shape) == q.shape
    assert np.array_equal(got.numpy(), np_dequantize(q, scale, zp))


@pytest.mark.parametrize("scale,zp,qmax", Q_CASES)
def test_quantize_dequantize_roundtrip_on_grid(scale, zp, qmax):
    """Codes → float → codes is the identity (the grid points survive fp32)."""
    q = np.arange(0, qmax + 1, max(1, qmax // 997)).astype(np_code_dtype(qmax))
    x = OPS.dequantize(t(q), scale, zp)
    assert np.array_equal(OPS.quantize(x, scale, zp, BITS[qmax]).numpy(), q)


@pytest.mark.parametrize("kind", list(WEIGHT_KINDS))
@pytest.mark.parametrize("shape", [(6, 20), (6, 5, 1, 1)], ids=["linear", "conv1x1"])
def test_dequantize_weight(kind, shape):
    rng = np.random.default_rng(3)
    wq, w_scale, w_zp = make_weight(kind, shape[0], int(np.prod(shape[1:])), rng)
    wq = wq.reshape(shape)
    bshape = (shape[0],) + (1,) * (len(shape) - 1)
    scale = w_scale.reshape(bshape)
    zp = None if w_zp is None else w_zp.reshape(bshape)
    got = OPS.dequantize_weight(t(wq), t(scale), t(zp))
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    want = wq.astype(F32)
    if zp is not None:
        want = want - zp.astype(F32)
    want = (want * scale).astype(F32)
    assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("bits", [4, 4.5, 5.5, 8])
@pytest.mark.parametrize("scheme", ["narrow", "wide"])
def test_dequantize_weight_of_numpy_codes_equals_fake_quant_weight(bits, scheme):
    """FOLDED consistency: fake_quant_weight(w) == dequantize_weight(codes(w)) bit for bit, with the
    codes/scales/zero points computed here in NumPy (the fake_quant contract)."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((8, 24)) * rng.uniform(0.01, 3, (8, 1))).astype(F32)
    w[2] = 0.0
    if scheme == "narrow":
        qmax = F32(2.0 ** (bits - 1) - 1.0)
        amax = np.abs(w).max(1, keepdims=True)
        scale = np.where(amax == 0, F32(1), amax / qmax).astype(F32)
        hi = np.floor(qmax)
        q = np.clip(np.rint(w / scale), -hi - 1, hi)
        wq, zp = q.astype(np.int8), None
    else:
        bound = F32(2.0 ** bits)
        top = np.floor(bound) - 1
        wmin, wmax = w.min(1, keepdims=True), w.max(1, keepdims=True)
        scale = ((wmax - wmin) / bound).astype(F32)
        scale = np.where(scale == 0, F32(1), scale).astype(F32)
        zpf = np.clip(np.rint(-wmin / scale), 0, top)
        q = np.clip(np.rint(w / scale) + zpf, 0, top)
        wq, zp = q.astype(np.uint8), zpf.astype(np.int32)
    fq = OPS.fake_quant_weight(t(w), torch.tensor(float(bits)), 0, scheme)
    dq = OPS.dequantize_weight(t(wq), t(scale), t(zp))
    assert torch.equal(fq, dq)


# --- qlinear --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(WEIGHT_KINDS))
@pytest.mark.parametrize("y_qmax", [255, 65535], ids=["A8", "A16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_shape", [(3, 32), (2, 5, 32), (32,)], ids=["2d", "3d", "1d"])
def test_qlinear(kind, y_qmax, with_bias, x_shape):
    c = layer_case(kind, y_qmax, with_bias, x_shape, seed=zlib.crc32(f"{kind}-{y_qmax}-{with_bias}".encode()))
    got = call(OPS.qlinear, c)
    want = np_qlinear(**c)
    assert got.dtype == (torch.uint8 if y_qmax == 255 else torch.int32)
    assert tuple(got.shape) == (*x_shape[:-1], c["wq"].shape[0])
    assert got.numpy().dtype == want.dtype and np.array_equal(got.numpy(), want)
    if len(x_shape) > 1:
        assert got.numpy().min() == 0 and got.numpy().max() == y_qmax   # both ends clamp


@pytest.mark.parametrize("w_zp_shape", [(6,), (6, 1)])
def test_qlinear_zero_point_shapes(w_zp_shape):
    c = layer_case("wide4", 255, True, (4, 16), seed=5)
    got = call(OPS.qlinear, c, w_zp=c["w_zp"].reshape(w_zp_shape))
    assert np.array_equal(got.numpy(), np_qlinear(**c))
    got = call(OPS.qlinear, c, w_scale=c["w_scale"].reshape(-1))          # 1-D scales too
    assert np.array_equal(got.numpy(), np_qlinear(**c))


def test_qlinear_large_accumulators():
    """|acc| well above 2**24: int32 accumulation exact, the int→fp32 conversion rounds (both sides)."""
    k = 1024
    rng = np.random.default_rng(10)
    xq = rng.integers(200, 256, size=(2, 3, k)).astype(np.uint8)
    wq = rng.integers(100, 128, size=(3, k)).astype(np.int8)
    wq[1] = -wq[1]
    acc = np_acc(xq, 0, wq, None)
    assert np.abs(acc).max() > 2 ** 24 and (acc.astype(F32).astype(np.int64) != acc).any()
    c = dict(xq=xq, x_scale=1e-3, x_zp=0, wq=wq, w_scale=np.full((3, 1), 2e-3, F32), w_zp=None,
             bias=None, y_scale=float(F32(0.37)), y_zp=30000, y_qmax=65535)
    got = call(OPS.qlinear, c)
    assert np.array_equal(got.numpy(), np_qlinear(**c))


def test_qlinear_accumulator_is_exact_integer_dot():
    """With unit scales, zero bias, S_y = 1 and a wide output range the output IS acc + z_y: the
    integer part of the op can be read off exactly."""
    rng = np.random.default_rng(6)
    xq = rng.integers(0, 256, size=(4, 40)).astype(np.uint8)
    wq = rng.integers(-8, 8, size=(5, 40)).astype(np.int8)
    acc = np_acc(xq, 77, wq, None)
    c = dict(xq=xq, x_scale=1.0, x_zp=77, wq=wq, w_scale=np.ones((5, 1), F32), w_zp=None, bias=None,
             y_scale=1.0, y_zp=32768, y_qmax=65535)
    got = call(OPS.qlinear, c).numpy().astype(np.int64)
    assert np.array_equal(got, acc + 32768)


@pytest.mark.parametrize("y_qmax", [255, 65535])
def test_qlinear_requant_ties_half_to_even(y_qmax):
    """y = acc + 0.5 exactly (unit scales, bias 0.5, S_y = 1): every output is a tie."""
    rng = np.random.default_rng(7)
    xq = rng.integers(120, 136, size=(6, 8)).astype(np.uint8)
    wq = rng.integers(-3, 4, size=(4, 8)).astype(np.int8)
    y_zp = 128 if y_qmax == 255 else 30000
    c = dict(xq=xq, x_scale=1.0, x_zp=128, wq=wq, w_scale=np.ones((4, 1), F32), w_zp=None,
             bias=np.full(4, 0.5, F32), y_scale=1.0, y_zp=y_zp, y_qmax=y_qmax)
    acc = np_acc(xq, 128, wq, None)
    assert len(np.unique(acc % 2)) == 2          # both parities → ties go down and up
    got = call(OPS.qlinear, c).numpy().astype(np.int64)
    want = np.vectorize(lambda a: min(max(round(a + 0.5) + y_zp, 0), y_qmax))(acc)
    assert np.array_equal(got, want)
    assert np.array_equal(got, np_qlinear(**c).astype(np.int64))


# --- qconv2d_1x1 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["int4", "int8", "wide4"])
@pytest.mark.parametrize("y_qmax", [255, 65535], ids=["A8", "A16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_qconv2d_1x1(kind, y_qmax, with_bias):
    n, ch, h, w_ = 2, 24, 3, 5
    c = layer_case(kind, y_qmax, with_bias, (n, h, w_, ch), seed=8)   # NHWC for the reference
    x_nchw = np.ascontiguousarray(np.moveaxis(c["xq"], -1, 1))
    w4 = c["wq"].reshape(c["wq"].shape[0], ch, 1, 1)
    scale4 = c["w_scale"].reshape(-1, 1, 1, 1)
    got = call(OPS.qconv2d_1x1, c, xq=x_nchw, wq=w4, w_scale=scale4)
    assert got.dtype == (torch.uint8 if y_qmax == 255 else torch.int32)
    assert tuple(got.shape) == (n, c["wq"].shape[0], h, w_) and got.is_contiguous()
    # reference computed on NCHW directly: contract over the channel axis
    acc = np.einsum("nchw,oc->nohw", x_nchw.astype(np.int64) - c["x_zp"],
                    w4.reshape(w4.shape[0], ch).astype(np.int64)
                    - (0 if c["w_zp"] is None else c["w_zp"].astype(np.int64)[:, None]))
    assert acc.min() >= I32.min and acc.max() <= I32.max
    want = np.moveaxis(np_requant(np.moveaxis(acc, 1, -1), c["x_scale"], c["w_scale"], c["bias"],
                                  c["y_scale"], c["y_zp"], y_qmax), -1, 1)
    assert np.array_equal(got.numpy(), want)
    assert np.array_equal(got.numpy(), np.moveaxis(np_qlinear(**c), -1, 1))


# --- registration (schema, fake kernels: shapes and dtypes) ---------------------------------------

def test_fake_kernels_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    c8 = layer_case("int4", 255, True, (2, 5, 16), seed=9)
    c16 = layer_case("wide4", 65535, False, (2, 5, 16), seed=9)
    for c in (c8, c16):
        real = call(OPS.qlinear, c)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = call(OPS.qlinear, c)
        assert fake.shape == real.shape and fake.dtype == real.dtype
    for op, args in [
        (OPS.quantize.default, (torch.randn(3, 4), 0.1, 3, BITS[255])),
        (OPS.quantize.default, (torch.randn(3, 4), 0.1, 3, BITS[65535])),
        (OPS.dequantize.default, (torch.randint(0, 255, (3, 4), dtype=torch.uint8), 0.1, 3)),
        (OPS.dequantize_weight.default, (torch.randint(-8, 8, (4, 6), dtype=torch.int8),
                                         torch.rand(4, 1), None)),
        (OPS.qlinear.default, tuple(t(v) if isinstance(v, np.ndarray) else BITS[v] if k == "y_qmax" else v
                                    for k, v in c8.items())),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_layer_args_are_named_by_both_integer_ops_schemas():
    """fbqc.agreement.layer_args (the CPU and HTP verifies read a layer's constants through it) takes the
    names from fbqc::qlinear's schema, and fbqc::qconv2d_1x1 takes the same arguments."""
    from fbqc.agreement import layer_args

    names = list(layer_args(list(range(10))))
    assert names == ["xq", "x_scale", "x_zp", "wq", "w_scale", "w_zp", "bias", "y_scale", "y_zp", "y_bits"]
    assert names == [a.name for a in torch.ops.fbqc.qconv2d_1x1.default._schema.arguments]
