"""Process-wide CPU settings that make training measurably faster.

glibc serves every allocation above 128 KiB-32 MiB (its adaptive mmap
threshold) with a fresh mmap, and hands freed memory back at once; each
training step then page-faults its activations and gradients in anew.
Raising the mmap and trim thresholds keeps those buffers in the heap for
reuse. The mmap threshold cannot go above 32 MiB, though, and the fast
recipe's first-group activations at batch 500 are 46 MB each: with the
thresholds alone a 32x32 step still took ~50,000 page faults and ran ~8%
slower than with mmap switched off altogether (M_MMAP_MAX = 0: every block
comes from the heap and is reused; docs/fast-recipe.md, "Where the time goes"). The
freed memory then stays with the process until it exits, which a training
run, whose steps reuse the same sizes, does not mind. Measured with
benchmarks/fast_step.py and benchmarks/train_speed.py;
CIFARCNN_NO_MALLOPT=1 turns it off for comparison.

`cpu_name` says which CPU a result came from: the same recipe's time
depends on it (an Intel Xeon with AMX and the AMD machine of the README
run bf16 convolutions with different oneDNN kernels: README, "Another CPU").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

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


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and the bf16 hardware oneDNN can use, e.g. "Intel(R) Xeon(R)
    Processor (AMX-BF16)": recorded with every run, since the machine sets the time."""
    name, flags = "", set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
            if name and flags:
                break
    except OSError:  # not Linux
        pass
    name = name or platform.processor() or platform.machine()
    bf16 = ("AMX-BF16" if "amx_bf16" in flags else
            "AVX512-BF16" if "avx512_bf16" in flags else None)
    return f"{name} ({bf16})" if bf16 else name
