"""Large buffers stay in the heap (issue 16).

glibc's malloc serves an allocation over its mmap threshold (128 KiB to begin with) with a
mapping of its own, unmapped again on free, and gives heap memory back to the system once
more than its trim threshold is free at the top. A sidecar relaying a fast stream makes and
frees several buffers of about 256 KiB per socket read (the read itself, the parser's seam,
the write built from the renumbered events), so with the defaults every chunk paid page
faults and the zeroing of fresh pages for each of them: measured on a 256 B stream of 500,000
events, 41,000-47,000 page faults and 0.66-0.74 CPU s in the sidecar, against 1,300-2,200
faults and 0.49-0.60 s with the thresholds below (`tests/unit/test_heap.py` counts the
faults).

Rules:

1. Only where the C library is glibc, through its `mallopt`; anywhere else nothing changes.
2. An operator's own malloc settings win: with `MALLOC_MMAP_THRESHOLD_`,
   `MALLOC_TRIM_THRESHOLD_` or a `glibc.malloc` tunable in `GLIBC_TUNABLES`, nothing changes.
3. The cost is bounded: at most `TRIM_THRESHOLD` bytes of freed memory stay mapped, and an
   allocation of `MMAP_THRESHOLD` or more (a replay of a large buffer) is still mapped apart.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_large_buffers"]

MMAP_THRESHOLD: Final = 1 << 20
TRIM_THRESHOLD: Final = 4 << 20
_M_TRIM_THRESHOLD: Final = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD: Final = -3
_OPERATOR_SETTINGS: Final = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_large_buffers() -> str:
    """Raise glibc's thresholds (rules 1-3); says what was done, for the start-up log."""
    if platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    if any(os.environ.get(v) for v in _OPERATOR_SETTINGS) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return "as the environment sets it"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "default (no mallopt)"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ):
        return "default (mallopt refused)"
    mmap_mib, trim_mib = MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20
    return f"large buffers kept (mmap threshold {mmap_mib} MiB, trim {trim_mib} MiB)"
