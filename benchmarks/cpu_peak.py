"""The CPU's arithmetic ceiling: how many bf16 and fp32 FLOP/s its vector units can issue.

    python benchmarks/cpu_peak.py [--seconds 1.0] [--threads 1 2] [--torch]

Times tight loops of one instruction kind on independent register
accumulators (no memory traffic, so nothing can run faster), in a small C
program compiled with gcc at run time: `vdpbf16ps` (AVX512-BF16, the dot
product oneDNN's bf16 convolutions are built on: 32 multiply-adds per
512-bit instruction) and `vfmadd231ps` (fp32 FMA, 16). A chain of dependent
integer adds (one per cycle) gives the clock, so the table also shows
FLOP per cycle per core, the figure that tells a double-pumped 256-bit
AVX-512 unit (Zen 4: 64 bf16 FLOP/cycle) from a full 512-bit one.
--torch then times what PyTorch's kernels (oneDNN, bf16, channels_last)
reach against that ceiling: a 2048-square matrix product and the fast
recipe's four largest convolutions (forward, batch 500), the convolutions
counted two ways: nominal FLOPs (every filter tap, as flop counters do) and
the taps that fall inside the image, the work oneDNN really does (it skips
the zero padding: 18% of the nominal taps at 7x7, 40% at 3x3).

The loops are written in inline assembly: with intrinsics, gcc merges
accumulators that start equal and receive the same updates, and the loop
then measures one instruction's latency instead of the units' throughput.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* 24 independent accumulators: enough to cover the instructions' latency */
#define OP(ins, c) __asm__(ins " %2, %1, %0" : "+v"(c) : "v"(x), "v"(y))
#define OPS(ins) OP(ins, c0); OP(ins, c1); OP(ins, c2); OP(ins, c3); OP(ins, c4); \
    OP(ins, c5); OP(ins, c6); OP(ins, c7); OP(ins, c8); OP(ins, c9); OP(ins, c10); \
    OP(ins, c11); OP(ins, c12); OP(ins, c13); OP(ins, c14); OP(ins, c15); OP(ins, c16); \
    OP(ins, c17); OP(ins, c18); OP(ins, c19); OP(ins, c20); OP(ins, c21); OP(ins, c22); \
    OP(ins, c23)

typedef struct { long n; int bf16; float sink; } job;

static void *kernel(void *arg) {
    job *j = arg;
    __m512 x = _mm512_set1_ps(1e-3f), y = _mm512_set1_ps(1.0f);
    __m512 c0 = _mm512_set1_ps(0), c1 = _mm512_set1_ps(1), c2 = _mm512_set1_ps(2),
           c3 = _mm512_set1_ps(3), c4 = _mm512_set1_ps(4), c5 = _mm512_set1_ps(5),
           c6 = _mm512_set1_ps(6), c7 = _mm512_set1_ps(7), c8 = _mm512_set1_ps(8),
           c9 = _mm512_set1_ps(9), c10 = _mm512_set1_ps(10), c11 = _mm512_set1_ps(11),
           c12 = _mm512_set1_ps(12), c13 = _mm512_set1_ps(13), c14 = _mm512_set1_ps(14),
           c15 = _mm512_set1_ps(15), c16 = _mm512_set1_ps(16), c17 = _mm512_set1_ps(17),
           c18 = _mm512_set1_ps(18), c19 = _mm512_set1_ps(19), c20 = _mm512_set1_ps(20),
           c21 = _mm512_set1_ps(21), c22 = _mm512_set1_ps(22), c23 = _mm512_set1_ps(23);
    for (long i = 0; i < j->n; i++) {
        if (j->bf16) { OPS("vdpbf16ps"); } else { OPS("vfmadd231ps"); }
        __asm__ volatile("" : "+v"(x), "+v"(y));  /* the operands are unknown every pass */
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                             _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(c12, c13), _mm512_add_ps(c14, c15)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(c16, c17), _mm512_add_ps(c18, c19)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(c20, c21), _mm512_add_ps(c22, c23)));
    j->sink = _mm512_reduce_add_ps(s);
    return NULL;
}

int main(int argc, char **argv) {
    /* usage: peak clock N | peak bf16|fp32 N THREADS; prints one number */
    long n = atol(argv[2]);
    double t = now();
    if (argv[1][0] == 'c') {
        /* register operands: recent Intel cores fold chains of immediate adds at rename
           (an immediate-add chain measured "10 GHz" on an Intel Xeon here) */
        long x = 0, one = argc;
        for (long i = 0; i < n; i++)
            __asm__ volatile("add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0"
                             : "+r"(x) : "r"(one));
        printf("%.6f\n", 4.0 * n / (now() - t) / 1e9);  /* GHz */
        return 0;
    }
    int threads = atoi(argv[3]), bf16 = argv[1][0] == 'b';
    pthread_t th[256];
    job jobs[256];
    for (int i = 0; i < threads; i++) {
        jobs[i] = (job){n, bf16, 0};
        pthread_create(&th[i], NULL, kernel, &jobs[i]);
    }
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    t = now() - t;
    /* per instruction: 16 fp32 lanes x (2 bf16 products or 1 fp32 product) x 2 FLOP */
    printf("%.6f\n", (bf16 ? 64.0 : 32.0) * 24 * n * threads / t / 1e12);  /* TFLOP/s */
    return 0;
}
"""


def build(workdir: Path) -> Path:
    """Compile the probe; a clear error where there is no gcc or no AVX512-BF16 assembler."""
    gcc = shutil.which("gcc")
    if gcc is None:
        sys.exit("cpu_peak: gcc not found: install gcc (Debian: apt install gcc) to build "
                 "the probe")
    src, exe = workdir / "peak.c", workdir / "peak"
    src.write_text(SOURCE)
    done = subprocess.run([gcc, "-O2", "-mavx512f", "-mavx512bf16", "-pthread", str(src),
                           "-o", str(exe)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"cpu_peak: gcc could not build the probe:\n{done.stderr.strip()}")
    return exe


def measure(exe: Path, what: str, n: int, threads: int = 1) -> float:
    args = [str(exe), what, str(n)] + ([str(threads)] if what != "clock" else [])
    return float(subprocess.run(args, capture_output=True, text=True, check=True).stdout)


def iterations(exe: Path, what: str, seconds: float) -> int:
    """Loop count that runs about `seconds` on one thread (timed on a short probe)."""
    n = 200_000
    rate = measure(exe, what, n)
    per_pass = 4 / 1e9 if what == "clock" else (64 if what == "bf16" else 32) * 24 / 1e12
    return max(n, int(seconds * rate / per_pass))


def torch_rates(threads: int, steps: int = 10) -> list[tuple[str, float, float]]:
    """(what, nominal TFLOP/s, inside-image TFLOP/s) of PyTorch's bf16 kernels."""
    import torch

    torch.set_num_threads(threads)

    def best(fn) -> float:
        times = []
        for _ in range(steps + 1):  # the first call also reorders the filters: not timed
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    rows = []
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    rate = 2 * 2048**3 / best(lambda: a @ b) / 1e12
    rows.append(("matmul 2048x2048", rate, rate))
    with torch.no_grad():
        for cin, cout, size in ((48, 192, 15), (192, 192, 7), (192, 256, 7), (256, 256, 3)):
            x = torch.randn(500, cin, size, size).to(torch.bfloat16).contiguous(
                memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(torch.bfloat16)
            conv = conv.to(memory_format=torch.channels_last)
            nominal = 2 * 500 * size * size * cout * cin * 9
            inside = (3 * size - 2) ** 2 / (3 * size) ** 2  # taps on the image, not the pad
            rate = nominal / best(partial(conv, x)) / 1e12
            rows.append((f"conv {cin}->{cout} at {size}x{size}", rate, rate * inside))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="about this long per row")
    ap.add_argument("--threads", type=int, nargs="+",
                    default=sorted({1, os.cpu_count() or 1}))
    ap.add_argument("--torch", action="store_true",
                    help="also time PyTorch's bf16 matmul and convolutions against the peak")
    a = ap.parse_args()
    if not all(1 <= t <= 256 for t in a.threads):
        ap.error(f"--threads {a.threads}: give thread counts from 1 to 256")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_bf16" not in flags:
        sys.exit("cpu_peak: this CPU lacks AVX512-BF16 (no avx512_bf16 in /proc/cpuinfo); "
                 "the probe needs it")
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        ghz = measure(exe, "clock", iterations(exe, "clock", a.seconds))
        print(f"clock (dependent integer adds): {ghz:.2f} GHz")
        print(f"{'instruction':<22} {'threads':>7} {'TFLOP/s':>8} {'FLOP/cycle/core':>16}")
        peak = {}
        for kind, name in (("bf16", "vdpbf16ps (bf16 dot)"), ("fp32", "vfmadd231ps (fp32)")):
            n = iterations(exe, kind, a.seconds)
            for threads in a.threads:
                tflops = measure(exe, kind, n, threads)
                peak[kind, threads] = tflops
                per_cycle = tflops * 1e3 / ghz / threads
                print(f"{name:<22} {threads:>7} {tflops:>8.3f} {per_cycle:>16.1f}", flush=True)
    if a.torch:
        print(f"\n{'PyTorch bf16 (batch 500)':<26} {'threads':>7} {'nominal':>8} "
              f"{'inside':>8} {'of peak':>8}")
        for threads in a.threads:
            for what, nominal, inside in torch_rates(threads):
                print(f"{what:<26} {threads:>7} {nominal:>8.3f} {inside:>8.3f} "
                      f"{inside / peak['bf16', threads]:>8.0%}", flush=True)


if __name__ == "__main__":
    main()
