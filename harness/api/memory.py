"""Keep freed memory in the process instead of handing it back to the kernel after every tensor.

glibc's malloc serves every allocation above its mmap threshold (32 MB at most) with a fresh `mmap`
and unmaps it on free, so every large tensor of a training step or an evaluation (the (B, T, vocab)
logits of the tiny GPT-2 are 412 MB) is new memory the kernel must fault in and zero, page by page.
`harness train --steps 10` on the tiny config spent 13.8-16.6 s of system time on that (4.1-4.4 million
minor page faults). With mmap off and the heap never trimmed, freed blocks stay on malloc's heap and are
reused: 2.6-3.8 s of system time, 0.7-0.8 million faults, and 31.6-34.1 s -> 18.1-22.1 s wall for that
command with the other fixed-cost changes (docs/training.md). A 1 GiB trim threshold was not enough (a
step's free space at the top of the heap exceeded it about one run in two). Same arithmetic, nothing
else changes. The price is that the process keeps its peak memory until it exits, which a command that
runs to completion does not mind.

`HARNESS_MALLOC=system` leaves malloc as it is. A no-op off glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # <malloc.h> parameter numbers
_M_MMAP_MAX = -4
NEVER_TRIM = -1  # glibc reads the threshold as size_t: -1 is "never give the heap's top back"


def keep_freed_memory() -> bool:
    """Turn glibc's per-allocation mmap off for this process; True where it took effect."""
    if os.environ.get("HARNESS_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, NEVER_TRIM)]
    return all([bool(mallopt(param, value)) for param, value in settings])
