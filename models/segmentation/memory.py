"""Freed memory kept in the process for the next array of the same size.

glibc hands every allocation above its mmap threshold back to the system when it is freed, so the next one is
faulted in again page by page. On the benchmark machine (a VM) a fresh page costs about 2 ms per MB: the
sliding window's activations of every network call, the class probabilities and the native-grid outputs of a
512 series paid it each time, over a second per study (``benchmarks/imaging``). Raising the mmap and trim
thresholds keeps such blocks in the heap, where the next allocation reuses them. Results do not change; the
process keeps up to ``TRIM_LIMIT_BYTES`` of freed memory between studies. Elsewhere than glibc: nothing is done.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["MMAP_LIMIT_BYTES", "TRIM_LIMIT_BYTES", "keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_LIMIT_BYTES = 512 * 2**20  # allocations up to this size come from the heap
TRIM_LIMIT_BYTES = 2**30  # freed heap memory kept up to this size


def keep_freed_memory() -> bool:
    """Set the process's glibc thresholds (once per process is enough; repeating is harmless); whether it
    could."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_LIMIT_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_LIMIT_BYTES)
    )
