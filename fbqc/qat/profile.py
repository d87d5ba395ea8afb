"""``fbqc train --profile``: the PyTorch profiler over a few steps after the warm-up, per process.

Writes ``RUN/profile/rank<R>.txt`` (the ops and kernels that took the most device time, or CPU time
on a CPU run) and ``rank<R>.trace.json`` (a Chrome / Perfetto trace: chrome://tracing or
https://ui.perfetto.dev) — where a slow step or a slow second GPU spends its time.
"""
from __future__ import annotations

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
        self.count += 1
        self.prof.step()

    def stop(self) -> None:
        self.prof.stop()
        if not self.written and self.rank == 0:
            self.log(f"--profile: the run ended before the {self.needed} steps it needs; no profile written")

    def _write(self, prof) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=50)
        steps = max(0, min(ACTIVE, self.count - self.skip - 1))      # fewer if the run ended inside
        (self.out / f"rank{self.rank}.txt").write_text(
            f"{steps} profiled steps, rank {self.rank}, sorted by {key}\n{table}\n")
        prof.export_chrome_trace(str(self.out / f"rank{self.rank}.trace.json"))
        self.written = True
        if self.rank == 0:
            self.log(f"profile of {steps} steps written to {self.out}/rank*.txt and rank*.trace.json")
