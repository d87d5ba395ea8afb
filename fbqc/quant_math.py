"""Level sets, containers and quantization parameters: the numbers every stage and backend agree on.

This module is the only home of the level and quantization-parameter formulas (DESIGN.md §3); the
fake-quant, dynamic, fused and integer ops (:mod:`fbqc.ops`), the passes and the backends call it.

Fractional bits are first class: ``b`` bits means the integer grid is bounded by ``2**(b-1)`` (signed,
narrow range) or ``2**b`` (unsigned, wide range) even when that is not a power of two (PAPER.md).
The bound is computed in float64 and rounded once to float32, so NumPy, torch and C agree on it::

    narrow qmax    Qn(b) = f32(2**(b-1) - 1)        levels -floor(Qn) - 1 … floor(Qn)   (weights)
    narrow scale   S = max|W| / Qn  (S = 1 where max|W| == 0)
    wide bound     B(b)  = f32(2**b)
    wide qmax      Qw(b) = floor(B(b)) - 1          levels 0 … Qw        (activations, wide weights)

    asymmetric (scale, zero point) of a range [lo, hi], widened to hold 0 (lo ≤ 0 ≤ hi):
                   S = (hi - lo) / steps            steps = Qw (activations) or B(b) (wide weights)
                   S = 1 where S == 0               (a zero-width range: everything maps to z)
                   z = clamp(round(-lo / S), 0, Qw)

Each formula is written once, over tensors (``*_t``: the bit-width is a *tensor*, so the ops that call
them stay traceable by dynamo/inductor and a schedule writing the bits buffer causes no graph break and
no recompilation). The Python-float forms (``narrow_qmax``, ``act_levels``, ``act_qparams`` …: passes,
specs, integer kernels, backends) run the same tensor code on a 0-d float64 CPU tensor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _disable_current_modes

MIN_BITS, MAX_BITS = 2.0, 16.0   # below 2 bits a narrow-range weight has levels −1…0: every weight 0


def check_bits(bits: float, what: str = "bits") -> float:
    """Validate a bit-width: a number in [2, 16] (below 2, narrow range leaves the levels −1…0 and
    every weight rounds to 0). Returns it as float."""
    try:
        b = float(bits)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [2, 16], got {bits!r}") from None
    if not math.isfinite(b) or not (MIN_BITS <= b <= MAX_BITS):
        hint = " (below 2 bits every weight quantizes to 0)" if math.isfinite(b) and 1 < b < MIN_BITS else ""
        raise ValueError(f"{what} must be a number in [2, 16], got {bits!r}{hint}")
    return b


# --- the formulas, over tensors (traceable; the bit-width stays a tensor input) ---------------------

def pow2_bound(bits: torch.Tensor, offset: float = 0.0, minus: float = 0.0) -> torch.Tensor:
    """``2**(bits + offset) - minus`` computed in float64 and rounded once to float32."""
    return (torch.exp2(bits.detach().to(torch.float64) + offset) - minus).to(torch.float32)


def narrow_qmax_t(bits: torch.Tensor) -> torch.Tensor:
    """Narrow range's ``Qn = 2**(b-1) - 1`` (float32; the scale divisor, not floored)."""
    return pow2_bound(bits, -1.0, 1.0)


def narrow_levels_t(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed narrow range's lowest and highest level ``-floor(Qn) - 1, floor(Qn)`` (float32)."""
    hi = torch.floor(narrow_qmax_t(bits))
    return -hi - 1.0, hi


def sym_scale_t(amax: torch.Tensor, qmax: torch.Tensor) -> torch.Tensor:
    """Symmetric (narrow-range) scale ``S = amax / Qn``, ``S = 1`` where ``amax == 0`` (an all-zero
    channel quantizes to 0 with a safe scale)."""
    scale = amax / qmax
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def wide_bound_t(bits: torch.Tensor) -> torch.Tensor:
    """``B = 2**b`` (float32): the number of steps a wide-range weight's range is divided into."""
    return pow2_bound(bits)


def wide_qmax_t(bits: torch.Tensor) -> torch.Tensor:
    """Unsigned / wide range's top level ``Qw = floor(2**b) - 1`` (float32)."""
    return torch.floor(pow2_bound(bits)) - 1.0


def clamp0(t: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``clamp(t, 0, hi)`` with a tensor ``hi`` (a float ``min`` beside a tensor ``max`` makes dynamo
    read ``hi`` as a Python number: a graph break and a recompile per bit-width)."""
    return torch.clamp(t, torch.zeros_like(hi), hi)


def asym_qparams_t(lo: torch.Tensor, hi: torch.Tensor, qmax: torch.Tensor,
                   steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric unsigned (scale, zero point) of the range ``[min(lo, 0), max(hi, 0)]``, elementwise.

    ``S = (hi - lo) / steps`` rounded to float32 (``steps`` defaults to ``qmax``; wide-range weights
    pass ``2**b``), ``S = 1`` where it is 0, ``z = clamp(round(-lo / S), 0, qmax)`` (float, in the wider
    of ``lo``'s dtype and float32). Arithmetic happens in ``lo``/``hi``'s dtype: float32 in the ops,
    float64 for :func:`act_qparams`'s Python floats."""
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (qmax if steps is None else steps)).to(torch.float32)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, clamp0(torch.round(-lo / scale), qmax)


# --- the same formulas for Python floats (the tensor code on a 0-d float64 CPU tensor) -------------

def _t(v: float) -> torch.Tensor:
    return torch.tensor(float(v), dtype=torch.float64, device="cpu")


def _eager(fn):
    """Run ``fn`` on real CPU tensors even inside fake-tensor / tracing modes (an integer op's fake
    kernel asks for its output dtype), cached: the value depends on the arguments only."""
    @functools.lru_cache(maxsize=4096)
    @functools.wraps(fn)
    def wrapper(*args):
        with _disable_current_modes():
            return fn(*args)
    return wrapper


@_eager
def narrow_qmax(bits: float) -> float:
    """``2**(b-1) - 1`` as float32 (the scale divisor of narrow range): :func:`narrow_qmax_t`."""
    return float(narrow_qmax_t(_t(bits)))


@_eager
def narrow_levels(bits: float) -> tuple[int, int]:
    """Integer levels of signed narrow range: ``-floor(qmax) - 1 … floor(qmax)`` (5.5 bits → −22…21)."""
    lo, hi = narrow_levels_t(_t(bits))
    return int(lo), int(hi)


@_eager
def wide_levels(bits: float) -> tuple[int, int]:
    """Integer levels of unsigned wide range: ``0 … floor(2**b) - 1`` (:func:`wide_qmax_t`)."""
    return 0, int(wide_qmax_t(_t(bits)))


def act_levels(bits: float) -> tuple[int, int]:
    """Unsigned activation levels (uint8: 0…255, uint16: 0…65535)."""
    return wide_levels(bits)


def act_qmax(bits: float) -> int:
    """The top unsigned activation code of ``bits`` (8 → 255, 16 → 65535)."""
    return act_levels(bits)[1]


@dataclass(frozen=True)
class Container:
    """The smallest integer type that holds a level set: ``logical`` names it, ``dtype`` stores it."""

    logical: str          # "int4", "int8", "int16", "uint4", "uint8", "uint16"
    dtype: torch.dtype    # storage: int4 lives in int8 (packing happens in backends), uint16 in int32
    bits: int             # logical storage bits per element (4, 8, 16)


_SIGNED = [("int4", torch.int8, 4, -8, 7), ("int8", torch.int8, 8, -128, 127),
           ("int16", torch.int16, 16, -32768, 32767)]
_UNSIGNED = [("uint4", torch.uint8, 4, 0, 15), ("uint8", torch.uint8, 8, 0, 255),
             ("uint16", torch.int32, 16, 0, 65535)]


def container_for(lo: int, hi: int) -> Container:
    """Smallest container for the integer range ``[lo, hi]``."""
    table = _SIGNED if lo < 0 else _UNSIGNED
    for logical, dtype, bits, cmin, cmax in table:
        if cmin <= lo and hi <= cmax:
            return Container(logical, dtype, bits)
    raise ValueError(f"no integer container holds levels {lo}…{hi}")


def weight_container(bits: float, scheme: str) -> Container:
    lo, hi = narrow_levels(bits) if scheme == "narrow" else wide_levels(bits)
    return container_for(lo, hi)


def act_container(bits: float) -> Container:
    return container_for(*act_levels(bits))


def act_qparams(lo: float, hi: float, bits: float = 8) -> tuple[float, int]:
    """Asymmetric unsigned (scale, zero point) for the real range [lo, hi]; the range always holds 0.

    :func:`asym_qparams_t` in float64 on ``qmax = floor(2**b) - 1`` steps: ``S = (hi - lo) / qmax``
    rounded to float32, ``z = clamp(round(-lo / S), 0, qmax)``. A zero-width range (or one whose scale
    overflows float32) gets a safe scale of 1.0 (everything quantizes to the zero point).
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite")
    return _act_qparams(float(lo), float(hi), float(bits))


@_eager
def _act_qparams(lo: float, hi: float, bits: float) -> tuple[float, int]:
    scale, zp = asym_qparams_t(_t(lo), _t(hi), wide_qmax_t(_t(bits)))
    if not math.isfinite(float(scale)):
        return 1.0, 0
    return float(scale), int(zp)
