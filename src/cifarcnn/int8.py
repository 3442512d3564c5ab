"""int8 3x3 convolutions for training on a CPU: oneDNN's u8 x s8 kernel through PyTorch.

A training step's conv makes three products: the forward pass, the input gradient
and the filter gradient. The first two are plain 3x3, padding-1 convolutions (the
input gradient is the output gradient convolved with the filters flipped and their
channel axes swapped), so oneDNN's int8 kernel can run them: u8 activations with one
scale and zero point per tensor, s8 filters with one scale per output channel, the
sums in int32, written out in the float precision. On CPUs with VNNI (`vpdpbusd`:
four u8 x s8 products and their sum per 32-bit lane) that kernel ran the recipe's
convs 1.8-3.6x faster than fp32, and 1.3-2.9x with the quantizing here
(`benchmarks/int8_convs.py`, a Xeon without AMX, docs/fast-recipe.md "A twenty-second
round"). oneDNN has no int8 filter-gradient conv; for convs of at least
`FILTER_GRAD_MIN_OUT` output channels the filter gradient is an s8 x s8 matrix product
instead (`filter_grad`, torch._int_mm), and in float for the thinner ones, whose
product saves less than its quantizing and im2col copy cost.

Rounding is to nearest, per tensor for the activations (their minimum and maximum:
after a GELU they are nearly all positive, so an asymmetric range keeps 8 bits for
them) and symmetric for the output gradients (zero point 128), except the output
gradient of the filter gradient, rounded stochastically (`quantize_stochastic`). The
backward pass is straight-through: each product's gradient is taken as if there were
no rounding.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from . import native

ARGS = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups of a 3x3 conv


@functools.cache
def available() -> bool:
    """Whether this PyTorch has oneDNN's int8 conv and int8 matrix product (CPU builds of
    torch 2.3 and later)."""
    return (hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise")
            and hasattr(torch, "_int_mm"))


# A call costs ~0.3 ms beyond its arithmetic (the filters' rounding and oneDNN's packing,
# every call): at 71 million multiply-adds it ran 1.03 against fp32's 0.88 ms, at 1,062
# million 7.1 against 13.1 (one-off timings, 2 threads). Smaller convs stay in float.
MIN_MACS = 200_000_000
EVERY = 961  # int8_positions that reaches every conv of a 32x32 step (the first: 31x31)
# The filter gradient goes to torch._int_mm for convs with at least this many output
# channels (the product's rows), on any map: 0.31-0.76x oneDNN's fp32 time for the
# recipe's 192- and 256-channel convs from 15x15 down to 3x3, but 1.07-1.50x for its
# 48-channel ones, whose thin product does not pay for the quantizing and the im2col copy
# (one-off timings, docs/fast-recipe.md "A twenty-third round").
FILTER_GRAD_MIN_OUT = 128


@functools.cache
def pays() -> bool:
    """Whether the fast net trains its convs on the int8 kernel by default on this CPU: one
    with int8 dot products (VNNI) and no AMX, whichever float it trains in.

    Where it was measured: on the Xeon with VNNI and no AMX, where fp32 is the faster float
    (`config.cpu_bf16_pays`), every conv on it made a step 0.71-0.79x as long and the
    recipe 0.74x, for 0.11 points of accuracy over three seeds, about one seed's spread
    (docs/fast-recipe.md, "A twenty-second round"); on the Zen 5, where bf16 is, its steps
    took 0.80-0.85x a bf16 step's time ("A twenty-fourth round"). The Zen 4 has the same
    instructions, two int8 products to one bf16 per lane, but was not measured. With AMX
    bf16 has its own matrix units (not measured against int8), and without int8 dot
    products (AVX2) the kernel was barely faster than fp32 ("A seventeenth round"): off."""
    flags = native.cpu_flags()
    return (available() and native.cpu_supported() and bool({"avx512_vnni", "avx_vnni"} & flags)
            and not native.has_amx())


def worth(macs: int) -> bool:
    """Whether a conv of `macs` multiply-adds goes to the int8 kernel (where there is one)."""
    return macs >= MIN_MACS and available()


def flat(x: torch.Tensor) -> torch.Tensor:
    """x's elements as one vector in memory order: a view for a contiguous or channels_last
    tensor (a copy otherwise). Reductions over it ran 10x faster than over the 4-d
    channels_last tensor (torch.aminmax: 6.6 against 76 ms for 92 MB here)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


def _native_for(x: torch.Tensor) -> Any:
    """native.cpp's extension where its rounding kernels take x (fp32 or bf16, dense in
    the standard or channels_last order: they walk the memory flat), else None."""
    ext = native.extension()
    dense = (x.is_contiguous()
             or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)))
    return ext if ext is not None and x.dtype in (torch.float32, torch.bfloat16) and dense else None


def quantize(x: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, float, int]:
    """x as u8 (its memory format kept), with the scale and zero point that map it back.

    Asymmetric: the tensor's [min, max] (widened to hold 0) over 255 steps. Symmetric:
    [-max|x|, max|x|], zero point 128, for signed tensors centred on 0 (gradients).
    The rounding is one pass of native.cpp's kernel where it is built, PyTorch's
    quantize_per_tensor (the same numbers, two passes) elsewhere.
    """
    lo, hi = (float(v) for v in torch.aminmax(flat(x)))
    if symmetric:
        scale, zero = max(hi, -lo, 1e-30) / 127, 128
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max(hi - lo, 1e-30) / 255
        zero = min(255, max(0, round(-lo / scale)))
    ext = _native_for(x)
    if ext is not None:
        return ext.quantize_u8(x, scale, zero), scale, zero
    with warnings.catch_warnings():  # PyTorch marks its quantized tensor types deprecated
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(x.float(), scale, zero, torch.quint8).int_repr()
    return q, scale, zero


Quantized = tuple[torch.Tensor, float, int]  # `quantize`'s levels, scale and zero point


def quantize_stochastic(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """x as s8 levels in [-127, 127] (memory format kept) and their scale, max|x| / 127,
    each rounded down or up at random, up with probability its fraction: unbiased, where
    rounding to nearest zeroes everything under half a step (`filter_grad` says why that
    matters). The draws come from PyTorch's global generator, so a seeded run repeats;
    one pass of native.cpp's kernel where it is built, three of PyTorch's elsewhere."""
    lo, hi = (float(v) for v in torch.aminmax(flat(x)))  # 6x faster than abs().amax()
    scale = max(hi, -lo, 1e-30) / 127
    ext = _native_for(x)
    if ext is not None:
        return ext.quantize_s8_stochastic(x, scale, int(torch.randint(0, 1 << 31, ()))), scale
    noise = torch.rand_like(x, dtype=torch.float32)
    return torch.floor(x.float() / scale + noise).clamp_(-127, 127).to(torch.int8), scale


def conv3x3(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype,
            symmetric: bool = False, q: Quantized | None = None) -> torch.Tensor:
    """conv2d(x, weight, padding=1) on the int8 kernel, in `out_dtype`.

    x: (N, C, H, W), best channels_last; weight: (O, C, 3, 3), quantized per output
    channel; `q`: x already quantized (the filter gradient reuses the same levels).
    The result carries no gradient: the callers' autograd Function does.
    """
    q, scale, zero = quantize(x, symmetric) if q is None else q
    w = weight.detach().float()
    w_scales = (w.abs().amax((1, 2, 3)) / 127).clamp_min(1e-30)
    qw = torch.round(w / w_scales[:, None, None, None]).clamp_(-127, 127).to(torch.int8)
    stride, padding, dilation, groups = ARGS
    packed = torch.ops.onednn.qconv_prepack(qw, w_scales, scale, zero, stride, padding,
                                            dilation, groups, list(x.shape))
    w_zeros = torch.zeros(len(w_scales), dtype=torch.long)
    return torch.ops.onednn.qconv2d_pointwise(q, scale, zero, packed, w_scales, w_zeros, None,
                                              stride, padding, dilation, groups, 1.0, 0,
                                              out_dtype, "none", [], "")


def input_grad(grad: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype,
               q: Quantized | None = None) -> torch.Tensor:
    """The input gradient of conv2d(x, weight, padding=1) for the output gradient `grad`,
    on the int8 kernel: a conv of `grad` with the flipped, transposed filters (`q`:
    grad already quantized, symmetric)."""
    flipped = weight.detach().flip(2, 3).transpose(0, 1)
    return conv3x3(grad, flipped, out_dtype, symmetric=True, q=q)


def filter_grad(grad: torch.Tensor, x: torch.Tensor | None, chunk_bytes: int = 32 << 20,
                qx: Quantized | None = None) -> torch.Tensor:
    """The filter gradient of conv2d(x, weight, padding=1) for the output gradient `grad`,
    in fp32, from s8 x s8 matrix products (torch._int_mm; VNNI on x86).

    Both operands are quantized per tensor: x as the forward pass does (`quantize`; its u8
    levels less 128 are the s8 ones), grad symmetric and stochastically rounded
    (`quantize_stochastic`): rounded to nearest, the many gradients under half a step all
    became 0, and the recipe trained to 2 points less (docs/fast-recipe.md, "A
    twenty-third round"). x's im2col matrix (positions, 9 x channels) is built in s8 with
    its zero point past the border (the level of 0.0), and grad's transpose times it gives
    the sums; the activations' zero point comes out of them as zero point x grad's column
    sums. The batch goes in chunks whose matrix fits in `chunk_bytes`; each chunk's int32
    sums (at most 128 x 127 x its positions) are scaled to fp32 and added. `qx`: x
    already quantized (then `x` may be None), as the forward pass did: not done twice.
    """
    qx, sx, zx = quantize(x, symmetric=False) if qx is None else qx
    gs, sg = quantize_stochastic(grad)
    n, c, h, w = qx.shape
    o = gs.shape[1]
    pad = zx - 128  # 0.0's level in s8
    xs = torch.bitwise_xor(qx, 128).view(torch.int8).permute(0, 2, 3, 1)  # (n, H, W, C)
    gs = gs.permute(0, 2, 3, 1)  # (n, H, W, O): channels_last's memory order
    step = max(1, chunk_bytes // (h * w * 9 * c))
    total = torch.zeros(o, 9 * c)
    for i in range(0, n, step):
        padded = F.pad(xs[i:i + step], (0, 0, 1, 1, 1, 1), value=pad)  # (n, H+2, W+2, C)
        sn, sh, sw, sc = padded.stride()
        cols = padded.as_strided((len(padded), h, w, 3, 3, c),
                                 (sn, sh, sw, sh, sw, sc)).reshape(-1, 9 * c)
        g = gs[i:i + step].reshape(-1, o)  # (positions, O)
        # its transpose as a view: the product ran as fast on it as on a transposed copy,
        # which cost more than the product itself at 15x15 (77 against 48 ms)
        sums = torch._int_mm(g.t(), cols)
        # grad's column sums as a product too: ones times g ran 10-30x faster than
        # g.sum(0) (a strided int8 reduction: 78 ms of a 200 ms call at 31x31)
        ones = torch.ones(1, len(g), dtype=torch.int8)
        sums -= pad * torch._int_mm(ones, g)[0][:, None]
        total += sums.float()
    total *= sx * sg
    return total.view(o, 3, 3, c).permute(0, 3, 1, 2)
