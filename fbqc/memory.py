"""This machine's memory: what is available now (``/proc/meminfo``) and this process's peak RSS."""
from __future__ import annotations

import resource


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
