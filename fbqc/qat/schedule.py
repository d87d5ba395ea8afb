"""QAT bit-width schedules as data: phases of (bits, parts), the step budget split in proportion.

Named schedules (DESIGN.md §5, PAPER.md Table 4)::

    fractional  8:1,7:1,6:1,5.5:1,5:1,4.75:2,4.5:2,4.25:2,4:14
    integer     8:1,7:1,6:1,5:1,4:21
    simple      16:1,8:1,4:23        (16 = fake quant at 16 bits)
    direct      4:25                 (vanilla QAT at the target)

or a custom string ``"8:1,5.5:1,4:3"``. For a named schedule the target ``--bits`` replaces the final 4;
earlier phases at or below the target are merged into the final one (their parts go to it), so the
schedule still steps down and the step budget is unchanged. A custom string is taken as written.

Steps are split by the largest-remainder rule: phase i gets ``floor(steps * parts_i / total)`` steps,
and the steps left over go one each to the phases with the largest fractional remainders (the earlier
phase on a tie), so the parts add up to exactly ``steps``. A phase may get 0 steps when ``steps`` is
smaller than the number of phases; it is then skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from fbqc.quant_math import check_bits

NAMED = {
    "fractional": "8:1,7:1,6:1,5.5:1,5:1,4.75:2,4.5:2,4.25:2,4:14",
    "integer": "8:1,7:1,6:1,5:1,4:21",
    "simple": "16:1,8:1,4:23",
    "direct": "4:25",
}


@dataclass(frozen=True)
class Phase:
    bits: float
    parts: float


def _parse(text: str) -> tuple[Phase, ...]:
    phases = []
    for item in text.split(","):
        bits, sep, parts = item.strip().partition(":")
        if not sep:
            raise ValueError(f"schedule item {item.strip()!r} is not BITS:PARTS (e.g. '8:1,5.5:1,4:3', "
                             f"or one of {', '.join(NAMED)})")
        b = check_bits(bits, f"schedule bits {bits!r}")
        try:
            p = float(parts)
        except ValueError:
            raise ValueError(f"schedule item {item.strip()!r}: parts {parts!r} is not a number") from None
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"schedule item {item.strip()!r}: parts must be > 0")
        phases.append(Phase(b, p))
    return tuple(phases)


def split_steps(parts: list[float], steps: int) -> list[int]:
    """Largest-remainder split of ``steps`` in proportion to ``parts``; the result sums to ``steps``."""
    if steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    fr = [Fraction(p).limit_denominator(10**6) for p in parts]
    total = sum(fr)
    quotas = [steps * p / total for p in fr]
    base = [math.floor(q) for q in quotas]
    left = steps - sum(base)
    order = sorted(range(len(parts)), key=lambda i: (-(quotas[i] - base[i]), i))
    for i in order[:left]:
        base[i] += 1
    return base


@dataclass(frozen=True)
class Schedule:
    """A bit-width schedule over ``steps`` optimizer steps."""

    name: str                      # "fractional", … or "custom"
    phases: tuple[Phase, ...]
    steps: int

    @classmethod
    def parse(cls, text: str, steps: int, target_bits: float | None = None) -> "Schedule":
        """A named schedule (target bits replace the final 4) or a custom ``BITS:PARTS,…`` string."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"--steps must be a positive integer, got {steps!r}")
        text = text.strip()
        if text in NAMED:
            phases = _parse(NAMED[text])
            if target_bits is not None:
                target = check_bits(target_bits, "--bits")
                keep = [p for p in phases[:-1] if p.bits > target]
                merged = sum(p.parts for p in phases) - sum(p.parts for p in keep)
                phases = (*keep, Phase(target, merged))
            return cls(text, phases, steps)
        phases = _parse(text)
        if target_bits is not None and check_bits(target_bits, "--bits") != phases[-1].bits:
            raise ValueError(f"custom schedule {text!r} ends at {phases[-1].bits:g} bits but --bits is "
                             f"{float(target_bits):g}; end the schedule at the target bits or drop --bits")
        return cls("custom", phases, steps)

    # --- derived ------------------------------------------------------------------------------
    @property
    def final_bits(self) -> float:
        return self.phases[-1].bits

    @property
    def spec(self) -> str:
        return ",".join(f"{p.bits:g}:{p.parts:g}" for p in self.phases)

    def phase_steps(self) -> list[int]:
        return split_steps([p.parts for p in self.phases], self.steps)

    def boundaries(self) -> list[tuple[int, int, float]]:
        """``(first_step, end_step, bits)`` per phase with steps (0-based, end exclusive)."""
        out, start = [], 0
        for p, n in zip(self.phases, self.phase_steps()):
            if n:
                out.append((start, start + n, p.bits))
            start += n
        return out

    def bits_at(self, step: int) -> float:
        """Bit-width of the 0-based optimizer step ``step`` (the final bits at and after the end)."""
        for start, end, bits in self.boundaries():
            if start <= step < end:
                return bits
        return self.final_bits

    def changes_after(self, step: int) -> bool:
        """True when step ``step`` is the last one of a phase (the next one trains at other bits)."""
        return step + 1 < self.steps and self.bits_at(step + 1) != self.bits_at(step)

    def to_dict(self) -> dict:
        return {"name": self.name, "spec": self.spec, "steps": self.steps,
                "phases": [[p.bits, p.parts, n] for p, n in zip(self.phases, self.phase_steps())]}

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(d["name"], _parse(d["spec"]), int(d["steps"]))

    def describe(self) -> str:
        return " → ".join(f"{b:g} ({e - s})" for s, e, b in self.boundaries()) + f" bits over {self.steps} steps"
