"""Level sets, containers and quantization parameters: the numbers every stage and backend agree on.

Fractional bits are first class: ``b`` bits means the integer grid is bounded by ``2**(b-1)`` (signed,
narrow range) or ``2**b`` (unsigned, wide range) even when that is not a power of two (PAPER.md).
The bound is computed in float64 and rounded once to float32, so NumPy, torch and C agree on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def narrow_qmax(bits: float) -> float:
    """``2**(b-1) - 1`` as float32 (the scale divisor of narrow range)."""
    return float(torch.tensor(2.0 ** (bits - 1) - 1.0, dtype=torch.float64).float())


def narrow_levels(bits: float) -> tuple[int, int]:
    """Integer levels of signed narrow range: ``-floor(qmax) - 1 … floor(qmax)`` (5.5 bits → −22…21)."""
    q = math.floor(narrow_qmax(bits))
    return -q - 1, q


def wide_levels(bits: float) -> tuple[int, int]:
    """Integer levels of unsigned wide range: ``0 … floor(2**b) - 1``."""
    return 0, math.floor(2.0**bits) - 1


def act_levels(bits: float) -> tuple[int, int]:
    """Unsigned activation levels (uint8: 0…255, uint16: 0…65535)."""
    return wide_levels(bits)


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

    ``S = (hi - lo) / qmax`` in float32 and ``z = clamp(round(-lo / S), 0, qmax)``. A zero-width range
    gets a safe scale of 1.0 (everything quantizes to the zero point).
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite")
    qmin, qmax = act_levels(bits)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(torch.tensor((hi - lo) / (qmax - qmin), dtype=torch.float32))
    if scale == 0.0 or not math.isfinite(scale):
        return 1.0, 0
    zp = int(torch.tensor(-lo / scale, dtype=torch.float64).round().clamp(qmin, qmax))
    return scale, zp
