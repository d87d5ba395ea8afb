"""This machine's memory: what is available now (``/proc/meminfo``) and this process's resident and
peak memory."""
from __future__ import annotations

import resource
import sys


def available_bytes() -> int | None:
    """``MemAvailable`` (None where ``/proc/meminfo`` is not readable)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable")
    except OSError:
        return None


def peak_rss_mb() -> float:
    """This process's peak resident set size, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def process_memory() -> dict[str, int]:
    """This process's host memory, bytes: ``rss`` (resident now) and ``peak`` (its high-water mark),
    from ``/proc/self/status`` (VmRSS, VmHWM); elsewhere both are the peak ``getrusage`` reports."""
    try:
        with open("/proc/self/status") as f:
            kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
        return {"rss": kib["VmRSS"] * 1024, "peak": kib["VmHWM"] * 1024}
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"rss": peak, "peak": peak}
