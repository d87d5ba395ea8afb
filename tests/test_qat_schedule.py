"""QAT schedules as data: named tables, target bits, custom strings, the exact step split."""
from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from fbqc.qat import NAMED, Schedule, split_steps

TABLE4 = [(8, 1), (7, 1), (6, 1), (5.5, 1), (5, 1), (4.75, 2), (4.5, 2), (4.25, 2), (4, 14)]


def phases(s: Schedule):
    return [(p.bits, p.parts) for p in s.phases]


def test_named_schedules_are_the_papers_tables():
    assert phases(Schedule.parse("fractional", 250)) == TABLE4                  # PAPER.md Table 4
    assert phases(Schedule.parse("integer", 250)) == [(8, 1), (7, 1), (6, 1), (5, 1), (4, 21)]
    assert phases(Schedule.parse("simple", 250)) == [(16, 1), (8, 1), (4, 23)]
    assert phases(Schedule.parse("direct", 250)) == [(4, 25)]
    for name in NAMED:                                                            # equal compute: 25 parts
        assert sum(p for _, p in phases(Schedule.parse(name, 10))) == 25


def test_fractional_split_over_250_steps_is_10_per_part():
    s = Schedule.parse("fractional", 250)
    assert s.phase_steps() == [10, 10, 10, 10, 10, 20, 20, 20, 140]
    assert [s.bits_at(i) for i in (0, 9, 10, 39, 40, 49, 50, 69, 70, 109, 110, 249, 250)] == \
        [8, 8, 7, 5.5, 5, 5, 4.75, 4.75, 4.5, 4.25, 4, 4, 4]
    assert s.boundaries()[0] == (0, 10, 8) and s.boundaries()[-1] == (110, 250, 4)
    assert s.changes_after(9) and not s.changes_after(10) and not s.changes_after(249)
    assert Schedule.parse("simple", 25).bits_at(0) == 16     # 16 = fake quant at 16 bits


def test_target_bits_replace_the_final_4():
    s = Schedule.parse("fractional", 100, target_bits=3)
    assert phases(s)[:-1] == TABLE4[:-1] and phases(s)[-1] == (3, 14)
    # a target above some steps: those phases merge into the final one, the budget stays 25 parts
    s = Schedule.parse("fractional", 100, target_bits=4.5)
    assert phases(s) == [(8, 1), (7, 1), (6, 1), (5.5, 1), (5, 1), (4.75, 2), (4.5, 18)]
    assert phases(Schedule.parse("integer", 100, target_bits=6)) == [(8, 1), (7, 1), (6, 23)]
    assert phases(Schedule.parse("direct", 100, target_bits=4.5)) == [(4.5, 25)]
    assert Schedule.parse("fractional", 100, target_bits=4).spec == NAMED["fractional"]


def test_custom_schedules_and_errors():
    s = Schedule.parse("8:1,5.5:1,4:3", 10)
    assert s.name == "custom" and phases(s) == [(8, 1), (5.5, 1), (4, 3)] and s.phase_steps() == [2, 2, 6]
    assert Schedule.parse(" 8:1, 4:1 ", 3).phase_steps() == [2, 1]             # tie → earlier phase
    assert Schedule.from_dict(s.to_dict()) == s
    for bad, msg in [("8,4", "BITS:PARTS"), ("8:x", "not a number"), ("8:0", "> 0"), ("0.5:1", "[2, 16]"),
                     ("17:1", "[2, 16]"), ("frac", "BITS:PARTS")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            Schedule.parse(bad, 10)
    with pytest.raises(ValueError, match="ends at 4 bits but --bits is 3"):
        Schedule.parse("8:1,4:1", 10, target_bits=3)
    with pytest.raises(ValueError, match="positive integer"):
        Schedule.parse("fractional", 0)


def _hamilton(parts, steps):
    """Independent largest-remainder split with exact rationals."""
    total = sum(Fraction(p) for p in parts)
    quotas = [Fraction(steps) * Fraction(p) / total for p in parts]
    floors = [q.numerator // q.denominator for q in quotas]
    rest = sorted(range(len(parts)), key=lambda i: (floors[i] - quotas[i], i))[: steps - sum(floors)]
    return [f + (i in rest) for i, f in enumerate(floors)]


def test_split_sums_exactly_and_matches_largest_remainder():
    rng = random.Random(0)
    cases = [([p for _, p in TABLE4], n) for n in range(0, 60)] + \
        [([rng.choice([1, 2, 3, 0.5, 1.5, 14]) for _ in range(rng.randint(1, 9))], rng.randint(0, 5000))
         for _ in range(300)]
    for parts, steps in cases:
        got = split_steps(parts, steps)
        assert sum(got) == steps, (parts, steps)
        assert got == _hamilton(parts, steps), (parts, steps)
        total = sum(parts)
        assert all(abs(n - steps * p / total) < 1 for n, p in zip(got, parts))
    # every phase gets steps once there are enough; a tiny budget skips the smallest phases
    assert min(Schedule.parse("fractional", 25).phase_steps()) == 1
    s = Schedule.parse("fractional", 5)
    assert sum(s.phase_steps()) == 5 and [b for *_, b in s.boundaries()][-1] == 4
