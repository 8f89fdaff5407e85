"""Process memory policy for CPU inference workers.

The decoder allocates and frees the same few large tensors (B x hw x C, several MB) for
every batch of prompts. With glibc's default policy such blocks are mapped fresh from the
kernel and unmapped again on free, so every batch pays page faults and zeroing of every
page it touches: on a 2-core machine that was a third of the automatic mask generator's
decode time (benchmarks/amg.py). `retain_freed_memory` tells glibc to keep freed memory
for reuse instead. Resident memory then stays at the process's peak instead of falling
back after each batch, which is what a long-running worker wants anyway.

The pipeline's model actors and benchmarks/amg.py call it (a training step measured no
gain, so training workers do not); a library user may call it once at start-up. It changes
nothing where the C library is not glibc (macOS, musl), and blocks above `largest` are
still mapped and returned on free.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: int | None = None


def retain_freed_memory(largest: int = 1 << 30) -> bool:
    """Serve allocations up to `largest` bytes from the heap and keep freed memory up to
    that size for reuse. Returns whether the policy is in effect (False off glibc)."""
    global _applied
    if _applied == largest:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    value = min(largest, 2**31 - 1)
    if not (mallopt(_M_MMAP_THRESHOLD, value) and mallopt(_M_TRIM_THRESHOLD, value)):
        return False
    _applied = largest
    return True
