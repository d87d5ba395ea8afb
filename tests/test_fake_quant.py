"""``torch.ops.fbqc.fake_quant_weight`` / ``fake_quant_act`` against an independent NumPy reference.

The reference below is written again from PAPER.md and the op docstrings (it does not call fbqc's
``weight_codes`` / ``act_codes``). Contract: the grid bound (``2**(b-1) - 1`` narrow, ``2**b`` wide /
activations) is computed in float64 and rounded ONCE to float32; everything else is float32 arithmetic
with round-half-to-even (``np.rint`` on float32). Outputs must be bit-identical.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fbqc  # noqa: F401  registers torch.ops.fbqc.*

F32 = np.float32
FQW = torch.ops.fbqc.fake_quant_weight
FQA = torch.ops.fbqc.fake_quant_act

BITS = [2, 3, 4, 4.25, 4.5, 4.75, 5.5, 7, 8]
# Bit-widths where 2**(b-1) and 2**(b-1) - 1 lie in different binades, so "float64 then round once"
# and "round 2**(b-1) to float32, then subtract 1" give different float32 qmax (see test below).
BINADE_BITS = [2.25, 3.1, 3.25, 4.1, 5.05]

# Narrow range: full level set -floor(qmax)-1 … floor(qmax) (PAPER.md), written out by hand.
NARROW_LEVELS = {2: (-2, 1), 3: (-4, 3), 4: (-8, 7), 4.25: (-9, 8), 4.5: (-11, 10), 4.75: (-13, 12),
                 5.5: (-22, 21), 7: (-64, 63), 8: (-128, 127)}
# Level the max-magnitude *negative* element maps to: -rint(qmax), clamped at -floor(qmax)-1.
# (The bottom level is reachable only when frac(qmax) >= .5: 4.25 → 8.51, 5.5 → 21.63.)
NARROW_NEG_EXTREME = {2: -1, 3: -3, 4: -7, 4.25: -9, 4.5: -10, 4.75: -12, 5.5: -22, 7: -63, 8: -127}
# Wide range: top level floor(2**b) - 1.
WIDE_TOP = {2: 3, 3: 7, 4: 15, 4.25: 18, 4.5: 21, 4.75: 25, 5.5: 44, 7: 127, 8: 255}


# --- independent NumPy reference ------------------------------------------------------------------

def np_bound(bits: float, offset: float = 0.0) -> np.float32:
    """``2**(b + offset)`` in float64, rounded once to float32."""
    return F32(2.0 ** (float(bits) + offset))


def np_narrow_qmax(bits: float) -> np.float32:
    """``2**(b-1) - 1`` in float64, rounded once to float32 (the contract)."""
    return F32(2.0 ** (float(bits) - 1.0) - 1.0)


def _dims(ndim: int, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axis %= ndim
    return tuple(d for d in range(ndim) if d != axis)


def np_fake_quant_weight(w: np.ndarray, bits: float, axis: int | None, scheme: str):
    """Returns (out, q, scale, zp), all float32, scale/zp broadcastable to w."""
    w = w.astype(F32)
    dims = _dims(w.ndim, axis)
    if scheme == "narrow":
        qmax = np_narrow_qmax(bits)
        amax = np.abs(w).max(axis=dims, keepdims=True)
        scale = (amax / qmax).astype(F32)
        scale = np.where(amax == 0, F32(1.0), scale).astype(F32)
        hi = F32(np.floor(qmax))
        q = np.clip(np.rint(w / scale), -hi - F32(1.0), hi).astype(F32)
        zp = np.zeros_like(scale)
    else:
        bound = np_bound(bits)
        top = F32(np.floor(bound) - F32(1.0))
        wmin = np.minimum(w.min(axis=dims, keepdims=True), F32(0.0))   # the range holds 0
        wmax = np.maximum(w.max(axis=dims, keepdims=True), F32(0.0))
        scale = ((wmax - wmin) / bound).astype(F32)
        scale = np.where(scale == 0, F32(1.0), scale).astype(F32)
        zp = np.clip(np.rint(-wmin / scale), F32(0.0), top).astype(F32)
        q = np.clip(np.rint(w / scale) + zp, F32(0.0), top).astype(F32)
    out = ((q - zp) * scale).astype(F32)
    assert out.dtype == np.float32 and q.dtype == np.float32
    return out, q, scale, zp


def np_fake_quant_act(x: np.ndarray, scale: float, zp: float, bits: float):
    """Returns (out, pre-clamp code, qmax)."""
    x = x.astype(F32)
    s, z = F32(scale), F32(zp)
    qmax = F32(np.floor(np_bound(bits)) - F32(1.0))
    with np.errstate(over="ignore"):          # ±3.4e38 / S overflows to ±inf, as in torch
        pre = (np.rint(x / s) + z).astype(F32)
    q = np.clip(pre, F32(0.0), qmax)
    return ((q - z) * s).astype(F32), pre, qmax


def run_fqw(w: np.ndarray, bits: float, axis, scheme: str) -> np.ndarray:
    # bit-widths are float64 0-d tensors (as InsertFakeQuant's buffers), so 3.1 bits means 3.1
    out = FQW(torch.from_numpy(w.copy()), torch.tensor(float(bits), dtype=torch.float64), axis, scheme)
    assert out.dtype == torch.float32 and tuple(out.shape) == w.shape
    return out.numpy()


# --- test data ------------------------------------------------------------------------------------

def random_weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Channels (dim 0) of very different magnitude, an all-zero channel, one-signed channels,
    a single-nonzero channel and a channel whose max magnitude occurs with both signs."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(F32)
    mags = F32([1.0, 1e-3, 30.0, 0.0, 0.25, 1e3, 1.0, 1.0, 1.0, 1.0, 3e-7, 7.0])
    o = shape[0]
    assert o >= len(mags)
    w[: len(mags)] *= mags.reshape((-1,) + (1,) * (len(shape) - 1))
    w[3] = 0.0                       # all-zero channel
    w[6] = np.abs(w[6]) + F32(0.5)    # all positive
    w[7] = -np.abs(w[7]) - F32(0.5)   # all negative
    w[8] = 0.0
    w[8].flat[1] = F32(-2.5)          # single non-zero
    flat = w[9].reshape(-1)
    flat[0], flat[-1] = F32(4.0), F32(-4.0)   # max magnitude with both signs (ties for the amax)
    flat[1:-1] = np.clip(flat[1:-1], -3.9, 3.9)
    w[9] = flat.reshape(w[9].shape)
    return np.ascontiguousarray(w)


# --- 1. fake_quant_weight: exact agreement ---------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", ["narrow", "wide"])
@pytest.mark.parametrize("axis", [0, None, -1])
@pytest.mark.parametrize("shape", [(12, 40), (16, 8, 1, 1)], ids=["linear", "conv1x1"])
def test_fake_quant_weight_matches_numpy(bits, scheme, axis, shape):
    w = random_weights(shape, seed=1234)
    got = run_fqw(w, bits, axis, scheme)
    want, _, _, _ = np_fake_quant_weight(w, bits, axis, scheme)
    assert not np.isnan(got).any()
    assert np.array_equal(got, want), (
        f"{int((got != want).sum())} elements differ, max |diff| {np.abs(got - want).max()}")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", ["narrow", "wide"])
@pytest.mark.parametrize("axis", [0, None])
def test_all_zero_weights_give_zeros(bits, scheme, axis):
    w = np.zeros((4, 16), dtype=F32)
    w[1] = np.linspace(-1, 1, 16, dtype=F32)   # one live channel next to all-zero ones
    got = run_fqw(w, bits, axis, scheme)
    assert np.isfinite(got).all()
    if axis == 0:
        assert np.array_equal(got[[0, 2, 3]], np.zeros((3, 16), F32))
    got_all = run_fqw(np.zeros((4, 16), F32), bits, axis, scheme)
    assert np.isfinite(got_all).all() and not np.any(got_all)


@pytest.mark.parametrize("bits", BINADE_BITS)
def test_narrow_qmax_rounded_once_at_binade_crossing(bits):
    """qmax = 2**(b-1) - 1 must be formed in float64 and rounded once (quant_math.narrow_qmax does
    that). Here 2**(b-1) and 2**(b-1)-1 straddle a power of two, so rounding 2**(b-1) to float32
    first and subtracting 1 afterwards gives a different float32 qmax, hence different scales."""
    from fbqc.quant_math import narrow_qmax
    assert F32(narrow_qmax(bits)) == np_narrow_qmax(bits)   # the contract's own helper agrees with us
    w = random_weights((12, 64), seed=7)
    got = run_fqw(w, bits, 0, "narrow")
    want, _, _, _ = np_fake_quant_weight(w, bits, 0, "narrow")
    assert np.array_equal(got, want), (
        f"{int((got != want).sum())} elements differ, max |diff| {np.abs(got - want).max()}")


@pytest.mark.parametrize("bits", BITS)
def test_narrow_ties_round_half_to_even(bits):
    qmax = np_narrow_qmax(bits)
    hi = int(np.floor(qmax))
    halves = np.arange(-hi, hi, dtype=np.float64) + 0.5          # exact .5 codes, inside the grid
    w = np.concatenate([[float(qmax)], halves]).astype(F32)[None, :]  # amax = qmax → S == 1 exactly
    got = run_fqw(w, bits, 0, "narrow")
    want, _, scale, _ = np_fake_quant_weight(w, bits, 0, "narrow")
    assert scale.item() == 1.0
    assert np.array_equal(got, want)
    # Python's round() is half-to-even too: a third, scalar, opinion.
    expect_halves = np.array([round(float(h)) for h in halves], dtype=F32)
    assert np.array_equal(got[0, 1:], expect_halves)
    assert got[0, 0] == hi                                        # qmax itself: clamp(rint(qmax))


@pytest.mark.parametrize("bits", BITS)
def test_wide_ties_round_half_to_even(bits):
    bound = np_bound(bits)
    m = 1.0
    top = int(np.floor(bound)) - 1
    halves = np.arange(-m, top - m - 1, dtype=np.float64) + 0.5   # (w/S) half-integers, z == 1
    w = np.concatenate([[-m, float(bound) - m], halves]).astype(F32)[None, :]
    got = run_fqw(w, bits, 0, "wide")
    want, _, scale, zp = np_fake_quant_weight(w, bits, 0, "wide")
    assert scale.item() == 1.0 and zp.item() == m
    assert np.array_equal(got, want)
    expect_halves = np.array([round(float(h)) for h in halves], dtype=F32)
    assert np.array_equal(got[0, 2:], expect_halves)


# --- 1b. level sets --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", [0, None])
def test_narrow_level_set(bits, axis):
    lo, hi = NARROW_LEVELS[bits]
    assert (lo, hi) == (-int(np.floor(np_narrow_qmax(bits))) - 1, int(np.floor(np_narrow_qmax(bits))))
    a = F32(1.7)
    rng = np.random.default_rng(3)
    w = np.stack([
        np.linspace(-a, a, 4097, dtype=F32),                        # dense: every level hit
        rng.uniform(-a, a, 4097).astype(F32),
        np.linspace(-a, F32(0.3) * a, 4097, dtype=F32),             # max magnitude is negative
        np.linspace(-F32(0.2) * a, a, 4097, dtype=F32),             # max magnitude is positive
    ]).astype(F32)
    got = run_fqw(w, bits, axis, "narrow")
    _, _, scale, _ = np_fake_quant_weight(w, bits, axis, "narrow")
    codes = np.rint(got / scale)
    assert np.array_equal(codes, np.rint(codes))
    for c in range(w.shape[0]):
        levels = set(np.unique(codes[c]).astype(int).tolist())
        assert min(levels) >= lo and max(levels) <= hi, (c, min(levels), max(levels))
    if axis == 0:
        neg = NARROW_NEG_EXTREME[bits]
        assert set(np.unique(codes[0]).astype(int).tolist()) == set(range(neg, hi + 1))
        assert codes[0, -1] == hi and codes[0, 0] == neg          # ±amax → extremes
        assert codes[2, 0] == neg and codes[2].max() < hi           # negative amax → neg extreme
        assert codes[3, -1] == hi and codes[3].min() > neg          # positive amax → floor(qmax)
        # the level set size: 2*floor(qmax)+2 levels exist, the bottom one only reachable if frac>=.5
        assert hi - neg + 1 == (2 * hi + 2 if neg == lo else 2 * hi + 1)
    else:
        assert codes.max() == hi and codes.min() == NARROW_NEG_EXTREME[bits]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", [0, None])
def test_wide_level_set(bits, axis):
    top = WIDE_TOP[bits]
    assert top == int(np.floor(np_bound(bits))) - 1
    rng = np.random.default_rng(4)
    w = np.stack([
        np.linspace(-0.7, 1.3, 4097, dtype=F32),
        rng.uniform(-2.0, 0.5, 4097).astype(F32),
        np.linspace(-1.0, 1.0, 4097, dtype=F32),
    ]).astype(F32)
    got = run_fqw(w, bits, axis, "wide")
    _, _, scale, zp = np_fake_quant_weight(w, bits, axis, "wide")
    # the zero point is an integer in [0, top] (so the integer lowering is exact)
    assert np.array_equal(zp, np.rint(zp)) and zp.min() >= 0 and zp.max() <= top
    codes = np.rint(got / scale) + zp
    for c in range(w.shape[0]):
        levels = np.unique(codes[c]).astype(int)
        assert levels.min() >= 0 and levels.max() <= top
    if axis == 0:
        assert set(np.unique(codes[0]).astype(int).tolist()) == set(range(0, top + 1))
        # wmin → level 0 exactly (code of wmin is rint(wmin/S) + rint(-wmin/S) == 0), wmax → top
        for c in range(w.shape[0]):
            assert codes[c, np.argmin(w[c])] == 0
            assert codes[c, np.argmax(w[c])] == top
        # 0.0 is exactly representable: it dequantizes to 0
        assert got[2, 2048] == 0.0
    else:
        assert codes.min() == 0 and codes.max() == top


@pytest.mark.parametrize("bits", [4, 4.5, 8])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_wide_one_signed_channel_is_representable(bits, sign):
    """Wide range with an integer zero point: the range is widened to hold 0, S = (wmax - wmin)/2**b
    over [min(wmin, 0), max(wmax, 0)], so a channel whose weights all have one sign is still
    reconstructed within two steps S (the top level is floor(2**b) - 1 while S divides by 2**b, so the
    top of the range is clipped by up to 1 + frac(2**b) steps; it no longer collapses onto one level,
    as it did before the range held 0)."""
    w = (sign * np.linspace(1.0, 1.2, 64, dtype=F32))[None, :].astype(F32)
    got = run_fqw(w, bits, 0, "wide")
    step = (max(w.max(), 0) - min(w.min(), 0)) / np_bound(bits)
    err = np.abs(got - w).max()
    assert err <= 2.0 * step, f"max |W' - W| = {err}, step S = {step}: got {np.unique(got)}"
    assert len(np.unique(got)) > 1


# --- 2. straight-through gradients -----------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 5.5, 4.25, 4])
@pytest.mark.parametrize("scheme", ["narrow", "wide"])
@pytest.mark.parametrize("axis", [0, None])
def test_fake_quant_weight_straight_through_grad(bits, scheme, axis):
    w_np = random_weights((12, 24), seed=11)
    g_np = np.random.default_rng(12).standard_normal(w_np.shape).astype(F32)
    w = torch.from_numpy(w_np.copy()).requires_grad_()
    g = torch.from_numpy(g_np.copy())
    bits_t = torch.tensor(float(bits))
    (FQW(w, bits_t, axis, scheme) * g).sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    assert np.array_equal(w.grad.numpy(), g_np)
    assert bits_t.grad is None


ACT_CASES = [  # (bits, scale, zero point)
    (8, 0.05, 128.0),
    (8, 0.0123, 3.0),
    (8, 1.0 / 64, 0.0),
    (16, 3e-4, 30000.0),
    (16, 2.0 ** -10, 0.0),
    (7.5, 0.02, 90.0),      # fractional activation grid: levels 0 … floor(2**7.5)-1 = 180
]


def act_ties(scale: float, zp: float, bits: float) -> np.ndarray:
    """float32 inputs whose float32 quotient x / S is exactly an odd multiple of .5 (a tie), around
    code 0 and around qmax. For a non-power-of-two S, the float32 neighbours of S*(k+.5) are searched."""
    s = F32(scale)
    qmax = float(np.floor(np_bound(bits)) - 1)
    found = []
    for centre in (0.0, qmax):
        for k in range(-5, 6):
            code = centre + k + 0.5 - zp
            x = F32(np.float64(s) * code)
            for _ in range(8):
                if F32(x / s) == F32(code):
                    found.append(x)
                    break
                x = np.nextafter(x, F32(np.inf if F32(x / s) < code else -np.inf))
    assert len(found) >= 15, f"only {len(found)} exact ties for S={scale}"
    return np.array(found, dtype=F32)


def act_inputs(seed: int, scale: float, zp: float, bits: float) -> np.ndarray:
    """2000 random values (~40 % outside the grid), then exact ties, then extremes."""
    rng = np.random.default_rng(seed)
    qmax = float(np.floor(np_bound(bits)) - 1)
    lo, hi = -zp * scale, (qmax - zp) * scale
    span = hi - lo
    x = rng.uniform(lo - 0.3 * span, hi + 0.3 * span, 2000)
    extreme = [0.0, -0.0, lo, hi, 1e6, -1e6, 1e30, -1e30, np.inf, -np.inf, 3.4e38, -3.4e38]
    return np.concatenate([x.astype(F32), act_ties(scale, zp, bits), np.array(extreme, F32)])


# --- 3. fake_quant_act ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits,scale,zp", ACT_CASES)
def test_fake_quant_act_matches_numpy(bits, scale, zp):
    x = act_inputs(5, scale, zp, bits)
    got = FQA(torch.from_numpy(x.copy()), torch.tensor(scale, dtype=torch.float32),
              torch.tensor(zp, dtype=torch.float32), torch.tensor(float(bits)))
    assert got.dtype == torch.float32
    got = got.numpy()
    want, pre, qmax = np_fake_quant_act(x, scale, zp, bits)
    assert qmax == {8: 255, 16: 65535, 7.5: 180}[bits]
    assert np.array_equal(got, want)
    # clamping really happened on both sides, and the output stays on the grid [-z*S, (qmax-z)*S]
    s, z = F32(scale), F32(zp)
    assert (pre < 0).any() and (pre > qmax).any()
    assert got.min() == (F32(0) - z) * s and got.max() == (qmax - z) * s
    # the exact .5 ties were rounded half-to-even (checked with Python's round(), not np.rint)
    ties = act_ties(scale, zp, bits)
    n = len(ties)
    assert np.array_equal(x[2000:2000 + n], ties)
    q_exact = [min(max(round(float(F32(t / s))) + zp, 0.0), float(qmax)) for t in ties]
    assert np.array_equal(got[2000:2000 + n], (F32(q_exact) - z) * s)
    assert any(float(F32(t / s)) % 2 == 0.5 for t in ties)    # ties rounding down…
    assert any(float(F32(t / s)) % 2 == 1.5 for t in ties)    # …and up


@pytest.mark.parametrize("bits,scale,zp", ACT_CASES)
def test_fake_quant_act_clipped_straight_through_grad(bits, scale, zp):
    x_np = act_inputs(6, scale, zp, bits)
    x_np = x_np[np.isfinite(x_np)]
    g_np = np.random.default_rng(7).standard_normal(x_np.shape).astype(F32)
    x = torch.from_numpy(x_np.copy()).requires_grad_()
    (FQA(x, torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.float32),
         torch.tensor(float(bits))) * torch.from_numpy(g_np)).sum().backward()
    _, pre, qmax = np_fake_quant_act(x_np, scale, zp, bits)
    inside = (pre >= 0) & (pre <= qmax)
    assert inside.any() and (~inside).any()
    assert np.array_equal(x.grad.numpy(), np.where(inside, g_np, F32(0.0)))


# --- 4. the bit-width is a tensor: no recompilation -----------------------------------------------

SCHEDULE = [8.0, 7.0, 5.5, 4.75, 4.0]


def _check_schedule(fn, counter, make_args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for b in SCHEDULE:
        args = make_args(b)
        got = compiled(*args)
        want = fn(*args)
        assert torch.equal(got, want), b
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["dynamo", "aot_eager"])
def test_compile_weight_bits_change_without_recompile(backend):
    from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
    counter = CompileCounter() if backend == "dynamo" else CompileCounterWithBackend(backend)
    w = torch.from_numpy(random_weights((12, 40), seed=21))
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))

    def fn(x, w, bits):
        wq = torch.ops.fbqc.fake_quant_weight(w, bits, 0, "narrow")
        return x @ wq.t() + torch.ops.fbqc.fake_quant_weight(w, bits, None, "wide").sum()

    _check_schedule(fn, counter, lambda b: (x, w, torch.tensor(b)))
    # and the compiled results follow the bit-width (sanity: the graph is not constant-folded)
    outs = {b: torch.ops.fbqc.fake_quant_weight(w, torch.tensor(b), 0, "narrow") for b in (8.0, 4.0)}
    assert not torch.equal(outs[8.0], outs[4.0])


class _QATLinear(torch.nn.Module):
    """A QAT-style module: bit-width and activation qparams live in buffers written by the schedule."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(w.clone())
        self.register_buffer("bits", torch.tensor(8.0))
        self.register_buffer("a_bits", torch.tensor(8.0))
        self.register_buffer("a_scale", torch.tensor(0.03))
        self.register_buffer("a_zp", torch.tensor(120.0))

    def forward(self, x):
        x = torch.ops.fbqc.fake_quant_act(x, self.a_scale, self.a_zp, self.a_bits)
        w = torch.ops.fbqc.fake_quant_weight(self.weight, self.bits, 0, "narrow")
        return torch.nn.functional.linear(x, w)


@pytest.mark.parametrize("backend", ["dynamo", "aot_eager"])
def test_compile_module_buffer_schedule_without_recompile(backend):
    from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
    counter = CompileCounter() if backend == "dynamo" else CompileCounterWithBackend(backend)
    torch._dynamo.reset()
    m = _QATLinear(torch.from_numpy(random_weights((12, 40), seed=22)))
    cm = torch.compile(m, backend=counter, fullgraph=True)
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(1)) * 3
    g = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    for b in SCHEDULE:
        m.bits.fill_(b)                   # what the QAT schedule does: write the buffer in place
        got = cm(x)
        want = m(x)
        assert torch.equal(got, want), b
        # and the reference: eager op with a fresh bits tensor
        w_ref = FQW(m.weight.detach(), torch.tensor(b), 0, "narrow")
        assert torch.equal(w_ref, torch.from_numpy(
            np_fake_quant_weight(m.weight.detach().numpy(), b, 0, "narrow")[0]))
        if backend == "aot_eager":   # compiled backward: straight-through for the weight
            m.weight.grad = None
            (cm(x) * g).sum().backward()
            compiled_grad = m.weight.grad.clone()
            m.weight.grad = None
            (m(x) * g).sum().backward()
            assert torch.equal(compiled_grad, m.weight.grad)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    torch._dynamo.reset()


def test_compile_act_bits_change_without_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    x = torch.from_numpy(act_inputs(8, 0.05, 128.0, 8)[:2000].copy())

    def fn(x, s, z, bits):
        return torch.ops.fbqc.fake_quant_act(x, s, z, bits) * 2.0

    _check_schedule(fn, counter, lambda b: (x, torch.tensor(0.05), torch.tensor(128.0), torch.tensor(b)))


# --- op registration sanity (schema / fake / autograd) ---------------------------------------------

def test_opcheck_fake_quant_ops():
    w = torch.from_numpy(random_weights((12, 16), seed=31)).requires_grad_()
    x = torch.from_numpy(act_inputs(9, 0.05, 128.0, 8)[:64].copy()).requires_grad_()
    for axis, scheme in [(0, "narrow"), (None, "wide")]:
        torch.library.opcheck(torch.ops.fbqc.fake_quant_weight.default,
                              (w, torch.tensor(4.5), axis, scheme))
    # test_schema is left out for the act op: _fqa_setup's no-op ``x.detach().to(torch.float32)``
    # trips SchemaCheckMode ("operators below autograd are not allowed to directly return inputs").
    torch.library.opcheck(torch.ops.fbqc.fake_quant_act.default,
                          (x, torch.tensor(0.05), torch.tensor(128.0), torch.tensor(8.0)),
                          test_utils=("test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
