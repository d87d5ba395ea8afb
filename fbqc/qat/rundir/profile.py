"""``fbqc train --profile``: the PyTorch profiler over a few steps after the warm-up, per process.

Writes ``RUN/profile/rank<R>.txt`` (on a GPU, first the step's timeline: how much of it the GPU
computed, communicated (NCCL) without computing, or sat idle; then the ops and kernels that took the
most device time, or CPU time on a CPU run) and ``rank<R>.trace.json`` (a Chrome / Perfetto trace:
chrome://tracing or https://ui.perfetto.dev) — where a slow step or a slow second GPU spends its time.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

#: steps skipped first (torch.compile's first steps compile), then profiled
SKIP, ACTIVE = 5, 3


class StepProfiler:
    def __init__(self, out: Path, rank: int, device: torch.device, steps_left: int, log) -> None:
        self.out, self.rank, self.cuda, self.log = Path(out), rank, device.type == "cuda", log
        self.skip = skip = max(0, min(SKIP, steps_left - ACTIVE - 1))
        self.needed, self.count = skip + 1 + ACTIVE, 0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=skip, warmup=1, active=ACTIVE),
                            on_trace_ready=self._write)
        self.written = False
        self.prof.start()

    def step(self) -> None:
        if self.prof is None:
            return
        self.count += 1
        self.prof.step()
        if self.written:          # done: let go of the recorded events now, not in a later (timed) step's GC
            self.prof.stop()
            self.prof = None
            gc.collect()

    def stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
        if not self.written and self.rank == 0:
            self.log(f"--profile: the run ended before the {self.needed} steps it needs; no profile written")

    def _write(self, prof) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=50)
        steps = max(0, min(ACTIVE, self.count - self.skip - 1))      # fewer if the run ended inside
        trace = self.out / f"rank{self.rank}.trace.json"
        prof.export_chrome_trace(str(trace))
        t = timeline(json.loads(trace.read_text()), steps) if self.cuda else None
        (self.out / f"rank{self.rank}.txt").write_text(
            (timeline_text(t) + "\n\n" if t else "")
            + f"{steps} profiled steps, rank {self.rank}, sorted by {key}\n{table}\n")
        self.written = True
        if self.rank == 0:
            self.log(f"profile of {steps} steps written to {self.out}/rank*.txt and rank*.trace.json")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _minus(xs, ys) -> float:
    """Length of the union ``xs`` outside the union ``ys`` (both sorted, disjoint)."""
    total, j = 0.0, 0
    for a, b in xs:
        covered = 0.0
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            covered += min(b, ys[k][1]) - max(a, ys[k][0])
            k += 1
        total += (b - a) - covered
    return total


def timeline(trace: dict, steps: int) -> dict | None:
    """Per-step milliseconds of a Chrome trace's GPU kernels, from the first kernel to the last:
    ``span``; ``compute`` (some non-NCCL kernel running), ``comm`` (some NCCL kernel running),
    ``comm_exposed`` (NCCL alone: the step waits on communication or on the other process) and
    ``idle`` (no kernel: the GPU waits for the CPU)."""
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not kernels or steps < 1:
        return None
    spans = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in kernels]
    nccl = _union([s for s, e in zip(spans, kernels) if "nccl" in e.get("name", "").lower()])
    compute = _union([s for s, e in zip(spans, kernels) if "nccl" not in e.get("name", "").lower()])
    busy = _union(spans)
    lo, hi = busy[0][0], busy[-1][1]
    ms = 1e-3 / steps
    return {"steps": steps, "span": (hi - lo) * ms, "compute": _length(compute) * ms, "comm": _length(nccl) * ms,
            "comm_exposed": _minus(nccl, compute) * ms, "idle": ((hi - lo) - _length(busy)) * ms}


def timeline_text(t: dict) -> str:
    f = lambda k: f"{t[k]:8.1f} ms  ({100 * t[k] / t['span']:5.1f} %)" if t["span"] else "-"   # noqa: E731
    return (f"GPU timeline, per step (mean of {t['steps']}): {t['span']:.1f} ms from the first kernel to the last\n"
            f"  computing (any non-NCCL kernel)      {f('compute')}\n"
            f"  communicating (NCCL kernels)         {f('comm')}\n"
            f"  only communicating (NCCL, no compute){f('comm_exposed')}\n"
            f"  idle (no kernel: waiting on the CPU) {f('idle')}")
