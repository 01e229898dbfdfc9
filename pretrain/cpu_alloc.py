"""glibc malloc settings for CPU runs: keep freed memory in the process for reuse.

A PKM training step frees and allocates the same large blocks every step (the value table's sparse
gradient, ~200 MB at 262k slots and 1k tokens; optimizer scratch rows; activations). glibc serves
every block above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on free, so each
step page-faults all of it in again: ~2 µs per 4 kB page on the team's VM, which made the PKM layer
1.4x slower than with the memory kept (benchmarks/pkm_layer.py, RESULTS.md). GPU runs do not pay this
(CUDA's caching allocator). Cost: the process keeps its peak heap instead of returning it to the OS.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc <malloc.h>
SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 256 << 20}


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap (no mmap), never trim it, grow it 256 MB at a time. Returns
    whether the settings took (False off glibc, e.g. macOS or musl: nothing is changed there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in SETTINGS.items())
