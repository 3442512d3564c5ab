"""Process-wide CPU settings that make training measurably faster.

glibc serves every allocation above 128 KiB-32 MiB (its adaptive mmap
threshold) with a fresh mmap, and hands freed memory back at once; each
training step then page-faults its activations and gradients in anew.
Raising the mmap and trim thresholds keeps those buffers in the heap for
reuse. Measured with benchmarks/train_speed.py; CIFARCNN_NO_MALLOPT=1 turns
it off for comparison.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_done = False


def tune_allocator() -> bool:
    """Keep large freed blocks in glibc's heap; True if applied (Linux/glibc only)."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get("CIFARCNN_NO_MALLOPT"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1
        ok = libc.mallopt(m_trim_threshold, 1 << 30) == 1 and ok
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
