"""QAT bit-width schedules as data: phases of (bits, parts), the step budget split in proportion.

Grammar (``--schedule``)::

    SCHEDULE  NAME | NAME@SHARE | PHASE,PHASE,…
    PHASE     BITS:PARTS          constant bits
              FROM..TO:PARTS      a ramp: the bits fall linearly from FROM to TO (FROM > TO)

Named schedules (DESIGN.md §5, PAPER.md Table 4)::

    fractional  8:1,7:1,6:1,5.5:1,5:1,4.75:2,4.5:2,4.25:2,4:14
    integer     8:1,7:1,6:1,5:1,4:21
    simple      16:1,8:1,4:23        (16 = fake quant at 16 bits)
    continuous  8..4:11,4:14         (fractional's 11/25 above 4 bits as one ramp, the same 14/25 at 4)
    direct      4:25                 (vanilla QAT at the target)

A ramp of n steps trains its step i (0-based within the phase) at ``FROM + (TO - FROM) * (i + 1) / n``
bits, so its last step is at TO. Bits are a tensor of the model: changing them every step costs nothing.
A phase ends (``changes_after``: the trainer checkpoints there) where the next phase starts, never inside
a ramp. ``continuous`` and ``fractional`` give the 4-bit phase the same steps, or (largest remainders over
2 vs 9 phases) one step apart for some budgets (e.g. 8, 17 mod 25).

``NAME@SHARE`` (any named schedule but ``direct``; 0 < SHARE < 1) gives the final phase that share of
the parts and the earlier phases ``1 - SHARE`` in their own proportions (``fractional@0.56`` splits as
``fractional``). For a named schedule the target ``--bits`` (applied after @SHARE) replaces the final 4
and a ramp's TO of 4; earlier phases at or below the target (a ramp: its FROM) are merged into the
final one (their parts go to it), so the schedule still steps down and the step budget is unchanged.
A custom string is taken as written (with ``--bits`` it must end at the target).

Steps are split by the largest-remainder rule: phase i gets ``floor(steps * parts_i / total)`` steps,
and the steps left over go one each to the phases with the largest fractional remainders (the earlier
phase on a tie), so the parts add up to exactly ``steps``. A phase may get 0 steps when ``steps`` is
smaller than the number of phases; it is then skipped.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

from fbqc.quant_math import check_bits

NAMED = {
    "fractional": "8:1,7:1,6:1,5.5:1,5:1,4.75:2,4.5:2,4.25:2,4:14",
    "integer": "8:1,7:1,6:1,5:1,4:21",
    "simple": "16:1,8:1,4:23",
    "continuous": "8..4:11,4:14",
    "direct": "4:25",
}


def _num(x: float) -> str:
    """``x`` as short as ``:g`` writes it where that reads back exactly, else its full ``repr``."""
    g = f"{x:g}"
    return g if float(g) == x else repr(float(x))


@dataclass(frozen=True)
class Phase:
    bits: float                       # the bits; a ramp: where it ends (TO)
    parts: float
    from_bits: float | None = None    # a ramp: where it starts (FROM > bits); None: constant bits

    @property
    def ramp(self) -> bool:
        return self.from_bits is not None

    @property
    def text(self) -> str:
        head = f"{_num(self.from_bits)}..{_num(self.bits)}" if self.ramp else _num(self.bits)
        return f"{head}:{_num(self.parts)}"


class Span(tuple):
    """One phase with steps: the 3-tuple ``(start, end, bits)`` (0-based steps, end exclusive; a ramp's
    ``bits`` is its TO), plus ``from_bits`` (a ramp's FROM; ``bits`` for a constant phase)."""

    def __new__(cls, start: int, end: int, bits: float, from_bits: float | None = None):
        self = super().__new__(cls, (start, end, bits))
        self.from_bits = bits if from_bits is None else from_bits
        return self

    def __getnewargs__(self):                          # pickle / copy
        return (*self, self.from_bits)

    start = property(lambda self: self[0])
    end = property(lambda self: self[1])
    bits = property(lambda self: self[2])

    @property
    def ramp(self) -> bool:
        return self.from_bits != self.bits

    @property
    def label(self) -> str:
        return f"{self.from_bits:g}→{self.bits:g}" if self.ramp else f"{self.bits:g}"

    def bits_at(self, step: int) -> float:
        """The bits of step ``step`` (0-based over the run, inside this span)."""
        n, i = self.end - self.start, step - self.start
        if not self.ramp or i >= n - 1:
            return self.bits
        return self.from_bits + (self.bits - self.from_bits) * (i + 1) / n


def _bits(text: str, item: str, what: str) -> float:
    return check_bits(text.strip(), f"schedule item {item!r}: {what}")


def _parse(text: str) -> tuple[Phase, ...]:
    phases = []
    for item in text.split(","):
        item = item.strip()
        head, sep, parts = item.partition(":")
        if not sep:
            raise ValueError(f"schedule item {item!r} is not BITS:PARTS or FROM..TO:PARTS (e.g. '8:1,5.5:1,4:3', "
                             f"'8..4:11,4:14', or one of {', '.join(NAMED)}, optionally NAME@SHARE)")
        frm, dots, to = head.partition("..")
        if dots:
            a, b = _bits(frm, item, "FROM bits"), _bits(to, item, "TO bits")
            if a == b:
                raise ValueError(f"schedule item {item!r} is a ramp from {a:g} to {b:g} bits; for constant bits "
                                 f"use TO:PARTS ({b:g}:{parts.strip()})")
            if a < b:
                raise ValueError(f"schedule item {item!r} rises from {a:g} to {b:g} bits; a ramp must fall "
                                 f"(FROM > TO, e.g. {b:g}..{a:g}:{parts.strip()})")
        else:
            a, b = None, check_bits(head, f"schedule bits {head!r}")
        try:
            p = float(parts)
        except ValueError:
            raise ValueError(f"schedule item {item!r}: parts {parts!r} is not a number") from None
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"schedule item {item!r}: parts must be > 0")
        phases.append(Phase(b, p, a))
    return tuple(phases)


def _with_share(phases: tuple[Phase, ...], share: Fraction) -> tuple[Phase, ...]:
    """The final phase gets ``share`` of the parts, the earlier ones ``1 - share`` in proportion."""
    *early, last = phases
    total = sum(Fraction(p.parts) for p in early)
    return (*(Phase(p.bits, float(Fraction(p.parts) * (1 - share) / total), p.from_bits) for p in early),
            Phase(last.bits, float(share), last.from_bits))


def _share(text: str, spec: str, name: str) -> Fraction:
    try:
        ok = 0 < float(text) < 1                   # a decimal number (not 1/2, nan, inf)
        s = Fraction(text.strip())                 # exact: fractional@0.56 splits as fractional
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"schedule {spec!r}: SHARE must be a number in (0, 1), the final phase's fraction of "
                         f"the steps, e.g. {name}@0.5; got {text.strip()!r}")
    return s


def _retarget(phases: tuple[Phase, ...], target: float) -> tuple[Phase, ...]:
    """A named schedule at ``target`` bits: the final bits (and a ramp's TO at them, or below the target)
    become the target; earlier phases at or below it merge into the final phase."""
    end = phases[-1].bits
    keep, merged = [], Fraction(phases[-1].parts)        # exact: @SHARE parts are not integers
    for p in phases[:-1]:
        if (p.from_bits if p.ramp else p.bits) <= target:
            merged += Fraction(p.parts)
            continue
        if p.ramp and (p.bits == end or p.bits < target):
            p = Phase(target, p.parts, p.from_bits)
        keep.append(p)
    return (*keep, Phase(target, float(merged)))


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

    name: str                      # "fractional", "fractional@0.3", … or "custom"
    phases: tuple[Phase, ...]
    steps: int

    @classmethod
    def parse(cls, text: str, steps: int, target_bits: float | None = None) -> "Schedule":
        """A named schedule (``NAME`` or ``NAME@SHARE``; target bits replace the final 4) or a custom
        ``BITS:PARTS`` / ``FROM..TO:PARTS`` list."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"--steps must be a positive integer, got {steps!r}")
        text = text.strip()
        name, at, share = text.partition("@")
        name = name.strip()
        if at:
            with_share = ", ".join(n for n in NAMED if n != "direct")
            if name == "direct":
                raise ValueError(f"schedule {text!r}: direct is one phase at the target, it has no share to set; "
                                 f"use direct, or @SHARE on {with_share}")
            if name not in NAMED:
                raise ValueError(f"schedule {text!r}: @SHARE follows a named schedule ({with_share}), "
                                 f"e.g. fractional@0.3")
        if name in NAMED:
            phases = _parse(NAMED[name])
            if at:
                s = _share(share, text, name)
                phases = _with_share(phases, s)
                name = f"{name}@{_num(float(s))}"
            if target_bits is not None:
                phases = _retarget(phases, check_bits(target_bits, "--bits"))
            return cls(name, phases, steps)
        phases = _parse(text)
        if target_bits is not None and check_bits(target_bits, "--bits") != phases[-1].bits:
            raise ValueError(f"custom schedule {text!r} ends at {phases[-1].bits:g} bits but --bits is "
                             f"{float(target_bits):g}; end the schedule at the target bits or drop --bits")
        return cls("custom", phases, steps)

    # --- derived ------------------------------------------------------------------------------
    @property
    def final_bits(self) -> float:
        """The last phase's end bits (a ramp: its TO)."""
        return self.phases[-1].bits

    @property
    def spec(self) -> str:
        return ",".join(p.text for p in self.phases)

    def phase_steps(self) -> list[int]:
        return split_steps([p.parts for p in self.phases], self.steps)

    @cached_property
    def _spans(self) -> tuple[Span, ...]:             # computed once: bits_at runs every step
        out, start = [], 0
        for p, n in zip(self.phases, self.phase_steps()):
            if n:
                out.append(Span(start, start + n, p.bits, p.from_bits))
            start += n
        return tuple(out)

    @cached_property
    def _starts(self) -> list[int]:
        return [s for s, _, _ in self._spans]

    def boundaries(self) -> list[Span]:
        """One :class:`Span` ``(first_step, end_step, bits)`` per phase with steps (0-based, end
        exclusive; a ramp's bits are its TO, its FROM is ``span.from_bits``)."""
        return list(self._spans)

    def phase_index(self, step: int) -> int:
        """Index into :meth:`boundaries` of the phase that trains step ``step`` (the last one at and after
        the end). A phase starts at step ``s > 0`` when ``changes_after(s - 1)``."""
        return max(0, bisect.bisect_right(self._starts, step) - 1)

    def bits_at(self, step: int) -> float:
        """Bit-width of the 0-based optimizer step ``step`` (the final bits at and after the end)."""
        if not 0 <= step < self.steps:
            return self.final_bits
        return self._spans[self.phase_index(step)].bits_at(step)

    def changes_after(self, step: int) -> bool:
        """True when step ``step`` is the last one of a phase (the next step starts another phase); not
        inside a ramp, whose bits change every step."""
        return 0 <= step and step + 1 < self.steps and self.phase_index(step + 1) != self.phase_index(step)

    def to_dict(self) -> dict:
        return {"name": self.name, "spec": self.spec, "steps": self.steps,
                "phases": [[[p.from_bits, p.bits] if p.ramp else p.bits, p.parts, n]
                           for p, n in zip(self.phases, self.phase_steps())]}

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(d["name"], _parse(d["spec"]), int(d["steps"]))

    def describe(self) -> str:
        parts = [f"{s.label} ramp ({s.end - s.start})" if s.ramp else f"{s.bits:g} ({s.end - s.start})"
                 for s in self.boundaries()]
        return " → ".join(parts) + f" bits over {self.steps} steps"
