"""What int8 arithmetic would save the fast recipe's convolutions: int8 against float, per conv.

    python benchmarks/int8_convs.py [--widths 48,192,256] [--batch 1000] [--threads N]
                                    [--precision auto|fp32|bf16] [--steps 5]

A training step's 3x3 convs make three products each: the forward pass,
the input gradient and the filter gradient. The forward pass and the input
gradient are ordinary convolutions (the input gradient of a stride-1,
padding-1 conv is the conv of the output gradient with the filters flipped
and their channel axes swapped), so both could run on oneDNN's int8 kernel:
u8 activations (a zero point of 128 holds signed values) times s8 filters
with one scale per filter, accumulated in int32 and written out in the
float precision. Vector units do twice as many int8 multiply-adds per
instruction as bf16 ones (`vpdpbusd` against `vdpbf16ps`), and AVX2's
`vpmaddubsw` sequence about twice fp32 FMAs' rate.

For each of the recipe's convs (widths as `--model-arg widths`, maps as in
a 32x32 step) the table gives the float conv's time, the int8 kernel's
alone (its operands quantized and packed ahead), and the whole call that
training makes with `--model-arg int8_positions=N` (`cifarcnn.int8`: a
min/max pass, the rounding pass of native.cpp's kernel, the filters
quantized and packed, the kernel); the relative error is that call's
result against the float one. Training accuracy with int8 products is a
separate question, answered with training runs (docs/fast-recipe.md, "A
seventeenth round" and "A twenty-second round").
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from cifarcnn import int8
from cifarcnn.config import resolve_precision
from cifarcnn.models.fast import PATCH

WHITEN_CHANNELS = 2 * 3 * PATCH * PATCH  # the whitening layer's output: its patches, both signs


def shapes(widths: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """(in channels, out channels, map size) of each 3x3 conv in a 32x32 step."""
    w1, w2, w3 = widths
    return [(WHITEN_CHANNELS, w1, 31), (w1, w1, 15), (w1, w2, 15), (w2, w2, 7), (w2, w3, 7),
            (w3, w3, 3)]


def best_ms(fn: Callable[[], object], steps: int) -> float:
    """Best of `steps` timed calls after one untimed call (which reorders the filters)."""
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def prepared(src: torch.Tensor, filters: torch.Tensor, symmetric: bool
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The int8 kernel alone: `src` quantized and the filters packed once, ahead of the
    timing, as `cifarcnn.int8.conv3x3` does on every call."""
    q, scale, zero = int8.quantize(src, symmetric)
    w = filters.float()
    scales = (w.abs().amax((1, 2, 3)) / 127).clamp_min(1e-30)
    qw = torch.round(w / scales[:, None, None, None]).clamp_(-127, 127).to(torch.int8)
    packed = torch.ops.onednn.qconv_prepack(qw, scales, scale, zero, *int8.ARGS, list(src.shape))
    zeros = torch.zeros(len(scales), dtype=torch.long)

    def run(out_dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.onednn.qconv2d_pointwise(q, scale, zero, packed, scales, zeros, None,
                                                  *int8.ARGS, 1.0, 0, out_dtype, "none", [], "")
    return run


def measure(cin: int, cout: int, size: int, batch: int, dtype: torch.dtype, steps: int
            ) -> list[tuple[str, float, float, float, float]]:
    """(pass, float ms, int8 kernel ms, int8 with quantizing ms, relative error) for one conv."""
    x = torch.randn(batch, cin, size, size).to(dtype).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn(batch, cout, size, size).to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3).to(dtype)
    args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, ...

    def input_grad() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(g, x, w, None, *args,
                                                   [True, False, False])[0]

    flipped = w.flip(2, 3).transpose(0, 1).contiguous()  # the input gradient's filters
    rows = []
    for name, src, filters, reference, whole, symmetric in (
            ("forward", x, w, lambda: F.conv2d(x, w, padding=1),
             partial(int8.conv3x3, x, w, dtype), False),
            ("input grad", g, flipped, input_grad, partial(int8.input_grad, g, w, dtype), True)):
        float_ms = best_ms(reference, steps)
        kernel = prepared(src, filters, symmetric)
        want = reference().float()
        error = float((whole().float() - want).norm() / want.norm())
        kernel_ms = best_ms(partial(kernel, dtype), steps)
        rows.append((name, float_ms, kernel_ms, best_ms(whole, steps), error))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="48,192,256", help="the three groups' widths")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="the float side (auto: bf16 where the CPU has it, as training does)")
    ap.add_argument("--steps", type=int, default=5, help="timed calls per row (best kept)")
    a = ap.parse_args()
    try:
        widths = tuple(int(v) for v in a.widths.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 3 or min(widths) < 1:
        ap.error(f"--widths {a.widths}: give three positive integers, e.g. 48,192,256")
    if a.batch < 1 or a.threads < 1 or a.steps < 1:
        ap.error("--batch, --threads and --steps must be at least 1")
    if not int8.available():
        sys.exit("int8_convs: this PyTorch has no oneDNN int8 conv (torch.ops.onednn."
                 "qconv2d_pointwise); use a CPU build of torch 2.3 or later")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)  # the same random operands every run
    precision = resolve_precision(a.precision, "cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    print(f"batch {a.batch}, {a.threads} threads, float side {precision}, channels_last, "
          f"best of {a.steps} (ms)")
    print(f"{'conv':<18} {'pass':<10} {precision:>8} {'int8':>8} {'ratio':>6} "
          f"{'+quant':>8} {'ratio':>6} {'rel err':>8}")
    totals = [0.0, 0.0, 0.0]
    with torch.no_grad():
        for cin, cout, size in shapes(widths):  # type: ignore[arg-type]
            for name, float_ms, kernel_ms, whole_ms, error in measure(
                    cin, cout, size, a.batch, dtype, a.steps):
                totals = [totals[0] + float_ms, totals[1] + kernel_ms, totals[2] + whole_ms]
                print(f"{f'{cin}->{cout} at {size}x{size}':<18} {name:<10} {float_ms:8.1f} "
                      f"{kernel_ms:8.1f} {float_ms / kernel_ms:6.2f} {whole_ms:8.1f} "
                      f"{float_ms / whole_ms:6.2f} {error:8.4f}")
    print(f"{'all':<18} {'both':<10} {totals[0]:8.1f} {totals[1]:8.1f} "
          f"{totals[0] / totals[1]:6.2f} {totals[2]:8.1f} {totals[0] / totals[2]:6.2f}")


if __name__ == "__main__":
    main()
