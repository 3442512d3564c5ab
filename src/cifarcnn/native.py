"""Hand-written CPU kernels for the fast net (native.cpp): its max-pool, BatchNorm and
GELU, fused, and the im2col copy of its small maps' filter gradients.

Once the convolutions ran on AMX (README, "Another CPU"), the layers between them
took over a quarter of a training step: max-pool, BatchNorm and GELU are each a
pass or two over memory in each direction, and PyTorch's max-pool also writes an
8-byte index per output. torch.compile, which should fuse them, made that block
1.7-3.7x slower on this CPU (docs/fast-recipe.md), so they are written by hand here:
`pool_bn_gelu` does a ConvGroup's "max-pool, BatchNorm, GELU" (or "BatchNorm,
GELU") in two passes forward and two backward, in fp32 arithmetic on bf16
channels_last tensors, and `gelu` the whitening layer's GELU alone; their GELU is
a rational function within 2e-6 of the exact (erf) one, about half the
arithmetic of an exp-based erf. `im2col_filter_grad` builds models/fast.py's
im2col matrices faster than PyTorch's strided copy. They are used in training
only, on x86 CPUs with AVX-512 (the machines this project runs on), for bf16
channels_last inputs; everything else takes PyTorch's own layers. The
extension is compiled on first use (30-40 s; torch.utils.cpp_extension caches
it under ~/.cache/torch_extensions, so later runs load it in a second) and
CIFARCNN_NO_NATIVE=1 turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_ext: Any = None
_tried = False
FLAGS = ("avx512f", "avx512bw", "avx512vl")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where unreadable)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supported(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on an x86-64 CPU with the AVX-512 parts the kernels use."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return set(FLAGS) <= cpu_flags(cpuinfo)


@functools.cache
def has_amx() -> bool:
    """Whether the CPU multiplies bf16 matrices in AMX tiles: there a plain matrix product
    runs at several times the rate of oneDNN's convolutions on the smallest maps
    (models/fast.py, DenseConv)."""
    return "amx_bf16" in cpu_flags()


def compile_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """g++ flags: the required AVX-512 parts, plus AVX512-BF16 where the CPU has it (one
    instruction rounds 16 floats to bf16, in place of eight: ~10% off the kernels), and
    OpenMP: without it ATen's header runs every `at::parallel_for` in the calling
    thread, so the kernels used one core of the two (the link flag is in `extension`)."""
    extra = ["-mavx512bf16"] if "avx512_bf16" in cpu_flags(cpuinfo) else []
    return ["-O3", *(f"-m{f}" for f in FLAGS), "-mfma", *extra, "-fopenmp"]


def extension() -> Any:
    """The compiled module, or None (turned off, another CPU, or no compiler: a warning)."""
    global _ext, _tried
    if _tried:
        return _ext
    _tried = True
    if os.environ.get("CIFARCNN_NO_NATIVE") or not cpu_supported():
        return None
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp links libgomp.so.1, the soname of the copy torch loads already: one runtime
        _ext = load(name="cifarcnn_native", sources=[str(Path(__file__).with_name("native.cpp"))],
                    extra_cflags=compile_flags(), extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # a missing compiler or headers: fall back, say so once
        warnings.warn(f"cifarcnn: the fused CPU kernels did not build ({type(err).__name__}: "
                      f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}); "
                      "training uses PyTorch's own layers, a little slower. Install a C++ "
                      "compiler (g++) to build them, or set CIFARCNN_NO_NATIVE=1 to skip.",
                      stacklevel=2)
        _ext = None
    return _ext


@contextlib.contextmanager
def turned_off() -> Iterator[None]:
    """PyTorch's own layers inside the block, as on a machine without the kernels: for
    comparisons (benchmarks/fast_step.py --native, the tests)."""
    global _ext, _tried
    saved = extension(), _tried
    _ext = None
    try:
        yield
    finally:
        _ext, _tried = saved


class PoolBnGelu(torch.autograd.Function):
    """gelu(batch_norm(max_pool2d(x, 2) if pool else x)) with batch statistics."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float, pool: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, p, code, mean, invstd, var = _ext.pool_bn_gelu_forward(x, weight, bias, eps, pool)
        ctx.save_for_backward(p, code, weight, bias, mean, invstd)
        ctx.pool, ctx.hw = pool, tuple(x.shape[2:])
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        p, code, weight, bias, mean, invstd = ctx.saved_tensors
        gx, gweight, gbias = _ext.pool_bn_gelu_backward(gy, p, code, weight, bias, mean,
                                                        invstd, ctx.pool, *ctx.hw)
        return (gx, gweight.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                gbias.to(bias.dtype) if ctx.needs_input_grad[2] else None, None, None)


class Gelu(torch.autograd.Function):
    """F.gelu (exact form), its forward and backward one pass each."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _ext.gelu_forward(x)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _ext.gelu_backward(gy, x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x), by the kernel for bf16 CPU tensors (PyTorch's GELU otherwise)."""
    if (x.device.type == "cpu" and x.dtype == torch.bfloat16
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and not torch.jit.is_scripting() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and extension() is not None):
        return Gelu.apply(x)
    return F.gelu(x)


def usable_for_im2col(grad: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `im2col_filter_grad` takes the kernel: bf16 channels_last CPU tensors."""
    return (x.device.type == "cpu" and x.dtype == grad.dtype == torch.bfloat16
            and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and extension() is not None)


def im2col_filter_grad(grad: torch.Tensor, x: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """models/fast.py's im2col_filter_grad as one kernel call: (out, 9 x in) in fp32, the
    columns ordered (row, column, channel) of the 3x3 window."""
    return _ext.im2col_filter_grad(grad, x, chunk_bytes)


def usable(x: torch.Tensor, norm: nn.BatchNorm2d) -> bool:
    """Whether `pool_bn_gelu` takes the fused kernels for this input."""
    # momentum None (a cumulative average in nn.BatchNorm2d) is left to PyTorch's layer
    return (norm.training and norm.track_running_stats and norm.momentum is not None
            and x.device.type == "cpu"
            and x.dtype == torch.bfloat16 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.jit.is_scripting() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()  # torch.compile fuses its own way
            and extension() is not None)


def pool_bn_gelu(x: torch.Tensor, norm: nn.BatchNorm2d, pool: bool) -> torch.Tensor:
    """gelu(norm(max_pool2d(x, 2))) (or without the pool), fused where `usable`.

    The fused path updates `norm`'s running statistics as nn.BatchNorm2d does
    (running += momentum x (batch - running), the variance unbiased).
    """
    if not usable(x, norm):
        return F.gelu(norm(F.max_pool2d(x, 2) if pool else x))
    y, mean, var = PoolBnGelu.apply(x, norm.weight, norm.bias, norm.eps, pool)
    with torch.no_grad():
        count = y.numel() // y.shape[1]
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var * (count / max(count - 1, 1)), norm.momentum)
        norm.num_batches_tracked += 1
    return y
