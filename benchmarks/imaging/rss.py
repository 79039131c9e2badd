"""A benchmark child's own peak memory (standard library only: the SDK's environment imports it too)."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mib() -> float:
    """This process's own peak resident set (VmHWM of its memory map since exec): ``ru_maxrss`` from ``wait4`` also
    counts the parent's resident set at the fork, whatever the child then uses."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")
