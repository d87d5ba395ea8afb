"""fbqc train --profile's GPU timeline (fbqc.qat.rundir.profile.timeline): per-step computing, communicating,
communication alone and idle time, against the same quantities counted microsecond by microsecond."""
from __future__ import annotations

import numpy as np
import pytest

from fbqc.qat.rundir.profile import timeline, timeline_text


def kernel(name: str, start: int, end: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": end - start}


@pytest.mark.parametrize("seed", range(5))
def test_timeline_matches_a_microsecond_count(seed):
    rng = np.random.default_rng(seed)
    events, compute, comm = [], np.zeros(20_000, bool), np.zeros(20_000, bool)
    for _ in range(60):
        a = int(rng.integers(0, 19_000))
        b = a + int(rng.integers(1, 900))
        nccl = rng.random() < 0.3
        events.append(kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL" if nccl else "triton_poi_fused_add", a, b))
        (comm if nccl else compute)[a:b] = True
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50_000})   # not a kernel
    busy = compute | comm
    lo, hi = np.flatnonzero(busy)[[0, -1]]
    steps = 2
    t = timeline({"traceEvents": events}, steps)
    ms = lambda n: n / 1e3 / steps                                          # noqa: E731
    assert t["span"] == pytest.approx(ms(hi + 1 - lo))
    assert t["compute"] == pytest.approx(ms(compute.sum()))
    assert t["comm"] == pytest.approx(ms(comm.sum()))
    assert t["comm_exposed"] == pytest.approx(ms((comm & ~compute).sum()))
    assert t["idle"] == pytest.approx(ms((~busy[lo:hi + 1]).sum()))
    text = timeline_text(t)
    assert f"{t['span']:.1f} ms" in text and "idle" in text


def test_no_kernels_no_timeline():
    assert timeline({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 5}]}, 3) is None
