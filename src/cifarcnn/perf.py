"""Process-wide CPU settings that make training measurably faster.

glibc serves every allocation above 128 KiB-32 MiB (its adaptive mmap
threshold) with a fresh mmap, and hands freed memory back at once; each
training step then page-faults its activations and gradients in anew.
Raising the mmap and trim thresholds keeps those buffers in the heap for
reuse. The mmap threshold cannot go above 32 MiB, though, and the fast
recipe's first-group activations at batch 500 are 46 MB each: with the
thresholds alone a 32x32 step still took ~50,000 page faults and ran ~8%
slower than with mmap switched off altogether (M_MMAP_MAX = 0: every block
comes from the heap and is reused; README, "Where the time goes"). The
freed memory then stays with the process until it exits, which a training
run, whose steps reuse the same sizes, does not mind. Measured with
benchmarks/fast_step.py and benchmarks/train_speed.py;
CIFARCNN_NO_MALLOPT=1 turns it off for comparison.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_done = False

# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def tune_allocator() -> bool:
    """Keep large freed blocks in glibc's heap; True if applied (Linux/glibc only)."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get("CIFARCNN_NO_MALLOPT"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and ok
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and ok
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
