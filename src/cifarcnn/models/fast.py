"""Fast: a small ResNet-free net built for speed per accuracy point (airbench's lineage).

The ideas come from the fastest public CIFAR-10 trainings (Page's ResNet-9,
hlb-CIFAR10, Keller Jordan's airbench), rewritten here: a first layer that
whitens 2x2 patches, initialised from the training data's patch covariance
and frozen, so the network starts from decorrelated inputs; three conv
groups (conv, max-pool, BatchNorm, GELU, conv, BatchNorm, GELU) that halve
the resolution each time; a global max-pool and a linear head whose logits
are divided by the width so early predictions stay soft. BatchNorm keeps
no trainable scale (the conv before it has one already) and forgets old
statistics fast (momentum 0.4), which suits a schedule of a few hundred steps.

Training (RECIPE, see optim.py): Muon for the conv filters, Nesterov SGD for
biases and head, a linear decay to zero, label smoothing, alternating flips
and 2-pixel reflected translations, progressive resizing (the first of 8
epochs on whole images shrunk to 16x16, the next two on 24x24 crops),
loss-based selection (the last 5 epochs train on the 70% of images that
had the highest loss when last seen), and test-time flips and shifts.
Widths (airbench uses 64/256/256), batch size and epochs were chosen by
measurement on the 2-core CPU, where a narrower net trained longer beat a
wide one trained briefly at equal time (docs/fast-recipe.md;
benchmarks/time_to_accuracy.py).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import int8, native

RECIPE = {
    "epochs": 8,
    "batch_size": 1000,  # as accurate as 500 over 3 seeds, 5% faster (half the steps)
    "optimizer": "muon",
    "lr": 0.17,  # Muon step per batch: 0.12 measured best at 500; airbench's 0.24 is at 2000
    "momentum": 0.85,  # SGD groups; Muon's own momentum is the model's muon_momentum
    "weight_decay": 0.0,  # per group below
    "schedule": "onecycle",  # with no warm-up: a straight decay from full rate to 0
    "warmup_epochs": 0.0,
    "label_smoothing": 0.2,
    "tta": "flip-shift",
    "tta_every_epoch": False,  # six views cost more than an epoch's worth of time saved
    "translate": 2,
    "pad_mode": "reflect",
    "flip": "alternate",
    "downscale": 16,  # epoch 1 on whole images shrunk to 16x16: 0.5x a 24x24 epoch's time
    "downscale_epochs": 1,
    "low_res": 24,  # epochs 2-3 on 24x24 crops: 0.6x the time of a 32x32 epoch
    "low_res_epochs": 2,
    "select_fraction": 0.7,  # epochs 4-8 train on the 70% of images with the highest loss
    "select_from_epoch": 3,
}

PATCH = 2  # the whitening layer sees 2x2 patches: 12 input dimensions
# Per-image rates of the SGD groups: a group's step is rate x global batch, so changing
# --batch-size keeps the step per image (the sum-of-losses convention). Weight decay is
# per image too: each step shrinks these parameters by decay x batch x (lr factor).
BIAS_LR, HEAD_LR, DECAY = 0.053, 0.67, 2e-6
WHITEN_BIAS_EPOCHS = 3  # the whitening bias trains this long, then stays fixed


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, channels: int, momentum: float) -> None:
        super().__init__(channels, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)  # the scale stays 1: the conv before sets it


def dirac_init(conv: nn.Conv2d) -> None:
    """Start a conv's first filters as identities: the input passes through untouched."""
    w = conv.weight.data
    nn.init.dirac_(w[:min(w.shape[:2])])


def im2col_filter_grad(grad: torch.Tensor, x: torch.Tensor,
                       chunk_bytes: int = 8 << 20) -> torch.Tensor:
    """The filter gradient of a 3x3, padding-1 conv as matrix products.

    Each output position's 3x3 input neighbourhood (zeros past the border) becomes
    a row of a (positions, 9 x channels) matrix, copied from one strided view of the
    zero-padded input; the output gradient's transpose times that matrix is the
    gradient. The batch goes in chunks whose matrix fits in `chunk_bytes`, so the
    copy is still in the cache when the product reads it (at 7x7 and 192 channels
    the whole batch's matrix is 169 MB), and the chunks' products add up in fp32.
    On small maps oneDNN's own filter-gradient kernel is the slowest product of a
    step on the AMX Xeon (docs/fast-recipe.md, "A sixth round"): at 7x7 and below
    this is 1.1-5 times faster there; at 15x15 and above oneDNN's is faster.
    """
    n, c, h, w = x.shape
    if native.usable_for_im2col(grad, x):  # the same numbers, 9-38% faster (native.py)
        return native.im2col_filter_grad(grad, x, chunk_bytes).view(-1, 3, 3, c).permute(
            0, 3, 1, 2)
    per_image = h * w * 9 * c * x.element_size()
    step = max(1, chunk_bytes // per_image)
    total = torch.zeros(grad.shape[1], 9 * c, dtype=torch.promote_types(x.dtype, torch.float32),
                        device=x.device)
    for i in range(0, n, step):
        xs, gs = x[i:i + step], grad[i:i + step]
        padded = F.pad(xs, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()  # (n, H+2, W+2, C)
        sn, sh, sw, sc = padded.stride()
        cols = padded.as_strided((len(xs), h, w, 3, 3, c),
                                 (sn, sh, sw, sh, sw, sc)).reshape(-1, 9 * c)
        g = gs.permute(0, 2, 3, 1).reshape(-1, gs.shape[1])  # (positions, out channels)
        total += g.t().contiguous() @ cols  # contiguous: the product runs faster (native.cpp)
    return total.view(-1, 3, 3, c).permute(0, 3, 1, 2)


class FilterGradConv(torch.autograd.Function):
    """A 3x3 conv (padding 1) whose filter gradient is computed our way.

    Two independent choices. `keep` < batch: the filter gradient comes from the
    batch's first `keep` images, scaled up by batch / keep: a noisier gradient for
    the filters, as from a smaller batch, for less arithmetic (the input gradient
    still covers the whole batch: the layers below need it). The batch is shuffled,
    so its first images are a random part of it. Every such conv here feeds a
    BatchNorm (through a max-pool or not), whose backward pass makes the output
    gradient sum to zero over the batch in each channel, so the whole batch's
    filter gradient does not see the inputs' mean; the part's gradient is centred
    the same way (its mean over its own images and positions removed), or that
    mean, large after a GELU, adds noise (without the centring the recipe validated
    at 33% after epoch 2, with it at 49%, against 69% for the whole batch; both
    ended 2.4 points below it). `gemm`: the gradient comes from
    `im2col_filter_grad`'s matrix products, not oneDNN's kernel: the same sums in
    another order. `quantized`: the forward pass and the input gradient run on
    oneDNN's int8 kernel (`cifarcnn.int8`), and for convs of at least 128 output
    channels the filter gradient on int8 matrix products (`int8.filter_grad`); the
    thinner convs' in float.
    Under autocast the conv runs in the autocast dtype, as nn.Conv2d's would.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, keep: int,
                gemm: bool, quantized: bool = False) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.keep, ctx.gemm, ctx.dtypes = keep, gemm, (x.dtype, weight.dtype)
        # where the filter gradient is int8 too, the backward pass reads x's int8
        # levels only: those are kept (a quarter of fp32's memory), not quantized twice
        ctx.quantized = quantized
        ctx.int8_filter_grad = (quantized and ctx.needs_input_grad[1]
                                and weight.shape[0] >= int8.FILTER_GRAD_MIN_OUT)
        if quantized:
            q = int8.quantize(xc, symmetric=False)
            if ctx.int8_filter_grad:
                ctx.save_for_backward(q[0], wc)
                ctx.x_scale, ctx.x_zero = q[1], q[2]
            else:
                ctx.save_for_backward(xc, wc)
            return int8.conv3x3(xc, weight, dtype, q=q)
        ctx.save_for_backward(xc, wc)
        with torch.autocast(device, enabled=False):
            return F.conv2d(xc, wc, padding=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, ...
        gx = gw = None
        if ctx.needs_input_grad[0] and ctx.quantized:
            gx = int8.input_grad(grad, w, ctx.dtypes[0])
        elif ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(grad, x, w, None, *args,
                                                     [True, False, False])[0]
            gx = gx.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            k = ctx.keep
            part, xs = grad, x
            if k < len(x):
                part, xs = grad[:k], x[:k]
                part = part - part.mean((0, 2, 3), keepdim=True)
            if ctx.int8_filter_grad:
                gw = int8.filter_grad(part, None, qx=(xs, ctx.x_scale, ctx.x_zero))
            elif ctx.gemm:
                gw = im2col_filter_grad(part, xs)
            else:
                gw = torch.ops.aten.convolution_backward(part, xs, w, None, *args,
                                                         [False, True, False])[1]
            gw = gw.to(ctx.dtypes[1])
            if k < len(x):
                gw = gw * (len(x) / k)
        return gx, gw, None, None, None


@functools.cache
def _tap_pairs(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a 3x3, padding-1 conv on an h x w map: every (input position, output position,
    tap) that meets inside the map, positions numbered row by row, taps (row, column)."""
    rows = [(yi * w + xi, yo * w + xo, ky * 3 + kx)
            for yo in range(h) for xo in range(w) for ky in range(3) for kx in range(3)
            for yi, xi in [(yo + ky - 1, xo + kx - 1)] if 0 <= yi < h and 0 <= xi < w]
    return tuple(torch.tensor(col) for col in zip(*rows, strict=True))  # type: ignore[return-value]


def tap_pairs(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_tap_pairs`, from its cache in eager mode; under torch.compile, computed, so that
    Dynamo traces them into the graph as constants without warning that it bypasses the
    cache."""
    return (_tap_pairs.__wrapped__ if torch.compiler.is_compiling() else _tap_pairs)(h, w)


class DenseConv(torch.autograd.Function):
    """A 3x3, padding-1 conv on a tiny map as one dense matrix product.

    On an h x w map with P = h x w positions the conv is a linear map from the
    image's P x C inputs to its P x O outputs: a (P C, P O) matrix whose (input
    position, output position) block is the filter tap joining them, or zero.
    A channels_last batch is already (N, P C) in memory, so the forward pass,
    the input gradient and the matrix's gradient are three plain products; the
    filter gradient is the sum of the matrix gradient's blocks per tap (in fp32).
    At 1x1 and 2x2 every block is a real tap, so the products do exactly the
    conv's multiply-adds; at 3x3 1.65 times as many. oneDNN runs these maps far
    below its rate on larger ones: on the AMX Xeon the dense products were
    measured ~10x faster at 1x1, ~4x at 2x2 and 1.0-1.25x at 3x3 (docs/fast-recipe.md,
    "A thirteenth round"). Under autocast it computes in the autocast dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        o, p = weight.shape[0], h * w
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        pin, pout, tap = tap_pairs(h, w)
        taps = weight.to(dtype).permute(2, 3, 1, 0).reshape(9, c, o)
        blocks = taps.new_zeros(p, p, c, o)
        blocks[pin, pout] = taps[tap]
        dense = blocks.permute(0, 2, 1, 3).reshape(p * c, p * o)
        flat = x.to(dtype).permute(0, 2, 3, 1).reshape(n, p * c)  # a view if channels_last
        ctx.save_for_backward(flat, dense)
        ctx.shape, ctx.dtypes = (n, c, h, w, o), (x.dtype, weight.dtype)
        with torch.autocast(device, enabled=False):
            out = flat @ dense
        return out.view(n, h, w, o).permute(0, 3, 1, 2)  # channels_last

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, dense = ctx.saved_tensors
        n, c, h, w, o = ctx.shape
        p = h * w
        g = grad.to(flat.dtype).permute(0, 2, 3, 1).reshape(n, p * o)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (g @ dense.t()).view(n, h, w, c).permute(0, 3, 1, 2).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            pin, pout, tap = tap_pairs(h, w)
            blocks = (flat.t() @ g).view(p, c, p, o).permute(0, 2, 1, 3)
            per_pair = blocks[pin, pout].to(torch.promote_types(flat.dtype, torch.float32))
            taps = per_pair.new_zeros(9, c, o).index_add_(0, tap, per_pair)
            gw = taps.view(3, 3, c, o).permute(3, 2, 0, 1).to(ctx.dtypes[1])
        return gx, gw


class Conv3x3(nn.Conv2d):
    """A 3x3 conv, no bias, whose filter gradient can be computed our way (FilterGradConv).

    `weight_grad_fraction` below 1 takes it from part of the batch; on the CPU,
    maps of at most `gemm_positions` positions (height x width) take it as matrix
    products. Either goes through FilterGradConv in a training forward pass
    (eager and compiled runs; traced and scripted ones use the plain conv). On
    the CPU, maps of at most `dense_positions` positions run the whole conv as
    dense matrix products (DenseConv) in a training forward pass; that takes
    precedence over the filter-gradient matrix products. Maps of at most
    `int8_positions` positions run the forward pass and the input gradient on
    oneDNN's int8 kernel (where PyTorch has it, and the conv is big enough to pay:
    `int8.worth`).
    """

    def __init__(self, cin: int, cout: int, weight_grad_fraction: float = 1.0,
                 gemm_positions: int = 0, dense_positions: int = 0,
                 int8_positions: int = 0) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=False)
        self.weight_grad_fraction = float(weight_grad_fraction)
        self.gemm_positions = int(gemm_positions)
        self.dense_positions = int(dense_positions)
        self.int8_positions = int(int8_positions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and self.weight.requires_grad
                and not torch.jit.is_scripting() and not torch.jit.is_tracing()):
            # int(): TorchScript's round returns a float
            keep = max(1, int(round(self.weight_grad_fraction * x.shape[0])))  # noqa: RUF046
            cpu, positions = x.device.type == "cpu", x.shape[2] * x.shape[3]
            if cpu and positions <= self.dense_positions and keep == x.shape[0]:
                return self.dense(x)
            gemm = cpu and positions <= self.gemm_positions
            macs = x.shape[0] * positions * self.in_channels * self.out_channels * 9
            quantized = cpu and positions <= self.int8_positions and int8.worth(macs)
            if keep < x.shape[0] or gemm or quantized:
                return self.custom(x, keep, gemm, quantized)
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.unused
    def custom(self, x: torch.Tensor, keep: int, gemm: bool, quantized: bool) -> torch.Tensor:
        return FilterGradConv.apply(x, self.weight, keep, gemm, quantized)

    @torch.jit.unused
    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return DenseConv.apply(x, self.weight)


class ExtraConv(nn.Module):
    """One more conv3x3, BatchNorm, GELU at a group's resolution, optionally residual."""

    def __init__(self, channels: int, bn_momentum: float, residual: bool,
                 fraction: float = 1.0) -> None:
        super().__init__()
        self.residual = residual
        self.conv = Conv3x3(channels, channels, fraction)
        self.norm = BatchNorm(channels, bn_momentum)
        dirac_init(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.training and not torch.jit.is_scripting() and not torch.jit.is_tracing():
            y = self.norm_gelu(y)
        else:
            y = F.gelu(self.norm(y))
        return x + y if self.residual else y

    @torch.jit.unused
    def norm_gelu(self, x: torch.Tensor) -> torch.Tensor:
        return native.pool_bn_gelu(x, self.norm, pool=False)


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, bn_momentum: float, pool_first: bool = False,
                 extra: int = 0, residual: bool = False, fraction: float = 1.0) -> None:
        super().__init__()
        self.pool_first = pool_first
        self.conv1 = Conv3x3(cin, cout, fraction)
        self.norm1 = BatchNorm(cout, bn_momentum)
        self.conv2 = Conv3x3(cout, cout, fraction)
        self.norm2 = BatchNorm(cout, bn_momentum)
        for conv in (self.conv1, self.conv2):
            dirac_init(conv)
        self.extra = nn.Sequential(*[ExtraConv(cout, bn_momentum, residual, fraction)
                                     for _ in range(extra)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_first:
            return self.after_conv1(self.conv1(F.max_pool2d(x, 2)))
        return self.after_conv1(self.conv1(x))

    def after_conv1(self, x: torch.Tensor) -> torch.Tensor:
        """The group from its first conv's output on (FastNet may compute that conv itself)."""
        # (the test inline, not in a variable: TorchScript drops a branch only on a literal
        # torch.jit.is_scripting())
        if self.pool_first:
            x = F.gelu(self.norm1(x))
        elif self.training and not torch.jit.is_scripting() and not torch.jit.is_tracing():
            x = self.fused_norm_gelu(x, pool=True)
        else:
            x = F.gelu(self.norm1(F.max_pool2d(x, 2)))
        x = self.conv2(x)
        if self.training and not torch.jit.is_scripting() and not torch.jit.is_tracing():
            x = self.fused_norm_gelu(x, pool=False)
        else:
            x = F.gelu(self.norm2(x))
        return self.extra(x)

    @torch.jit.unused
    def fused_norm_gelu(self, x: torch.Tensor, pool: bool) -> torch.Tensor:
        """Max-pool, norm1, GELU (or norm2, GELU): fused kernels on AVX-512 CPUs in bf16
        (native.py), fewer passes over memory and a cheaper GELU than PyTorch's layers
        (docs/fast-recipe.md, "A seventh round" and "A ninth round")."""
        return native.pool_bn_gelu(x, self.norm1 if pool else self.norm2, pool=pool)


class FastNet(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (48, 192, 256), num_classes: int = 10,
                 bn_momentum: float = 0.4, muon_momentum: float = 0.6, ns_steps: int = 3,
                 freeze_first_group: int = 0,
                 pool_first: tuple[bool, bool, bool] = (False, False, False),
                 whiten_eps: float = 5e-4, whiten_act: bool = True,
                 whiten_dims: int = 0, extra_convs: tuple[int, int, int] = (0, 0, 0),
                 extra_residual: bool = False, weight_grad_fraction: float = 1.0,
                 gemm_grad_positions: int = 49, dense_positions: int | None = None,
                 int8_positions: int | None = None) -> None:
        """`muon_momentum`, `ns_steps` (Newton-Schulz iterations) and `freeze_first_group`
        shape the groups `optimizer_groups` returns: they live here so `--model-arg`
        reaches them and the weights' metadata records them. `pool_first` (one flag per
        group) moves a group's max-pool before its first conv, which then runs at a
        quarter of the positions, as a stride-2 ResNet stage does: on a CPU the FLOPs
        are the time, but it lost accuracy per second here (docs/fast-recipe.md).
        `whiten_eps` is added to the patch variances before the whitening divides by
        their square roots: larger values amplify the weakest directions less (on the
        JPEG data two of the 12 have variances ~1e-4; damping them did not pay).
        `whiten_dims` keeps only that many of the strongest directions (0: all 12), so
        the first conv reads fewer channels. `whiten_act=False` makes the whitening
        linear (one sign, no bias, no GELU) and folds it into the first conv, ~4x fewer
        multiply-adds at full resolution (`folded_kernel`). `extra_convs` (one count per
        group) appends that many more conv, BatchNorm, GELU layers to a group, added to
        their input with `extra_residual` (airbench96's deeper groups).
        `weight_grad_fraction` takes each conv's filter gradient from that share of
        the batch (`Conv3x3`; the first conv folded by `whiten_act=False` keeps the
        whole batch's): 19% off a step at 0.5, for 2.4 points. All measured
        slower per accuracy point than the defaults (docs/fast-recipe.md).
        `gemm_grad_positions`: on the CPU, convs on maps of at most that many positions
        (7x7: the last three convs at 32x32 inputs, more at smaller ones) take their
        filter gradient as matrix products (`im2col_filter_grad`), not from oneDNN's
        kernel: the same sums, measured 1.1-5x faster on the AMX Xeon (0: never).
        `dense_positions`: on the CPU, convs on maps of at most that many positions run
        as dense matrix products (`DenseConv`; 0: never). None picks 9 (3x3 maps: the
        last conv at 32x32 inputs, the last three at 16x16) on CPUs with AMX, where
        that was measured faster, and 4 elsewhere (2x2 and 1x1 maps, where the
        products do exactly the conv's multiply-adds; at 3x3 they do 1.65x as many,
        which a CPU without AMX would pay for).
        `int8_positions`: on the CPU, convs on maps of at most that many positions run
        their training forward pass and input gradient on oneDNN's int8 kernel
        (`cifarcnn.int8`; 961: every conv of a 32x32 step; 49: its 7x7 and 3x3 maps; 0:
        never). None, the default: 961 where `int8.pays()` (a CPU with int8 dot products
        and no AMX, as measured), 0 elsewhere. Evaluation stays in float
        (docs/fast-recipe.md, "A twenty-second round" and "A twenty-fourth round")."""
        super().__init__()
        self.muon_momentum, self.ns_steps = muon_momentum, ns_steps
        self.freeze_first_group = freeze_first_group
        self.whiten_eps = whiten_eps
        if isinstance(widths, str) or len(widths) != 3 or not all(
                type(w) is int and w > 0 for w in widths):
            raise ValueError(f"widths={widths!r}: give three whole numbers of channels > 0, "
                             "one per group, e.g. [48,192,256]")
        w1, w2, w3 = widths
        p1, p2, p3 = (bool(p) for p in pool_first)
        dims = 3 * PATCH * PATCH
        self.whiten_dims = int(whiten_dims) or dims  # the strongest directions kept
        if not 0 < self.whiten_dims <= dims:
            raise ValueError(f"whiten_dims={whiten_dims}: a {PATCH}x{PATCH} patch has {dims} "
                             f"directions; keep 1 to {dims} (0: all)")
        dims = self.whiten_dims
        # linear whitening: one sign, no bias (the BatchNorm after the first conv removes
        # any constant), and the first conv folded into it as one 4x4 conv on the pixels
        self.whiten_act = bool(whiten_act)
        self.fold_first = not self.whiten_act and not p1
        channels = 2 * dims if self.whiten_act else dims
        self.whiten = nn.Conv2d(3, channels, PATCH, padding=0, bias=self.whiten_act)
        self.whiten.weight.requires_grad_(False)
        extra = [int(e) for e in extra_convs]
        if len(extra) != 3 or min(extra) < 0:
            raise ValueError(f"extra_convs={list(extra_convs)}: give three counts >= 0, one "
                             "per group, e.g. [0,0,1]")
        e1, e2, e3 = extra
        r = bool(extra_residual)
        f = float(weight_grad_fraction)
        if not 0 < f <= 1:
            raise ValueError(f"weight_grad_fraction={weight_grad_fraction}: give a share of "
                             "the batch in (0, 1], e.g. 0.5")
        self.groups = nn.Sequential(ConvGroup(channels, w1, bn_momentum, p1, e1, r, f),
                                    ConvGroup(w1, w2, bn_momentum, p2, e2, r, f),
                                    ConvGroup(w2, w3, bn_momentum, p3, e3, r, f))
        if int(gemm_grad_positions) < 0:
            raise ValueError(f"gemm_grad_positions={gemm_grad_positions}: give a number of "
                             "positions >= 0 (0: never), e.g. 49")
        if dense_positions is None:
            dense_positions = 9 if native.has_amx() else 4
        if int(dense_positions) < 0:
            raise ValueError(f"dense_positions={dense_positions}: give a number of "
                             "positions >= 0 (0: never), e.g. 9")
        if int8_positions is None:
            int8_positions = int8.EVERY if int8.pays() else 0
        self.int8_positions = int(int8_positions)
        if int(int8_positions) < 0:
            raise ValueError(f"int8_positions={int8_positions}: give a number of "
                             "positions >= 0 (0: never), e.g. 49")
        for conv in self.groups.modules():
            if isinstance(conv, Conv3x3):
                conv.gemm_positions = int(gemm_grad_positions)
                conv.dense_positions = int(dense_positions)
                conv.int8_positions = int(int8_positions)
        self.head = nn.Linear(w3, num_classes, bias=False)
        with torch.no_grad():
            self.head.weight /= self.head.weight.std()  # unit weights; forward divides by width

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float | None = None) -> None:
        """Set the whitening filters from normalised training images (N, 3, H, W).

        The 12 eigenvectors of the 2x2x3 patch covariance (or the `whiten_dims`
        strongest), each scaled by 1/sqrt(eigenvalue), make the layer's outputs
        decorrelated with unit variance; the filters appear with both signs so the
        GELU after them loses nothing, and the bias centres the patches (the linear
        `whiten_act=False` layer keeps one sign and no bias).
        """
        eps = self.whiten_eps if eps is None else eps
        x = images.float()
        patches = F.unfold(x, PATCH).transpose(1, 2).reshape(-1, 3 * PATCH * PATCH)
        mean = patches.mean(0)
        cov = torch.cov((patches - mean).T)
        eigval, eigvec = torch.linalg.eigh(cov)
        w = eigvec.T / torch.sqrt(eigval + eps)[:, None]  # (12, 12): rows are filters
        w = w[len(w) - self.whiten_dims:]  # eigh sorts ascending: the strongest come last
        if self.whiten_act:
            w = torch.cat([w, -w])  # (2 x kept, 12): both signs
        # unfold orders a patch as (channel, row, col), the same as a conv weight's layout
        self.whiten.weight.copy_(w.view(-1, 3, PATCH, PATCH))
        if self.whiten.bias is not None:
            self.whiten.bias.copy_(-(w @ mean))

    def optimizer_groups(self, global_batch: int, lr: float) -> list[dict[str, Any]]:
        """MuonSGD groups: filters by Muon at `lr`; biases and head by SGD, per-image rates.

        `stop_epochs` ends a group's schedule early (its rate decays to 0 there,
        then its parameters stop taking gradients). With `freeze_first_group` = E
        the first conv group stops at epoch E, as in FreezeOut (Brock et al.,
        2017): the backward pass then ends at the second group, sparing the
        most expensive full-resolution layers' gradients (~18% of a 32x32 epoch
        measured, docs/fast-recipe.md).
        """
        filters = [p for p in self.groups.parameters() if p.ndim == 4]
        biases = [p for n, p in self.groups.named_parameters() if "norm" in n and p.requires_grad]
        first = {id(p) for p in self.groups[0].parameters()}
        stop = self.freeze_first_group

        def split(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
            if not stop:
                return [], params
            return [p for p in params if id(p) in first], [p for p in params if id(p) not in first]

        def muon(params: list[nn.Parameter], **extra: Any) -> dict[str, Any]:
            return {"params": params, "lr": lr, "muon": True, "momentum": self.muon_momentum,
                    "ns_steps": self.ns_steps, **extra}

        def sgd(params: list[nn.Parameter], rate: float, **extra: Any) -> dict[str, Any]:
            step = rate * global_batch
            return {"params": params, "lr": step, "weight_decay": DECAY / rate, **extra}

        early_filters, filters = split(filters)
        early_biases, biases = split(biases)
        groups = [muon(filters)]
        if self.whiten.bias is not None:
            groups.append(sgd([self.whiten.bias], BIAS_LR, stop_epochs=WHITEN_BIAS_EPOCHS))
        groups += [sgd(biases, BIAS_LR), sgd([self.head.weight], HEAD_LR)]
        if stop:
            groups += [muon(early_filters, stop_epochs=stop),
                       sgd(early_biases, BIAS_LR, stop_epochs=stop)]
        return groups

    def folded_kernel(self) -> torch.Tensor:
        """The linear whitening and the first conv as one 4x4 kernel (out, 3, 4, 4).

        A 3x3 conv of a 2x2 conv's output is a 4x4 conv of the pixels, whose
        filters are the full (flipped) convolutions of the two: 3 input channels
        in place of 12, so ~4x fewer multiply-adds at the largest resolution. The
        first conv's filters stay the parameters Muon sees; only the arithmetic
        moves. At the border the 3x3 taps that fell on the whitened map's zero
        padding now see whitened patches half made of the pixels' zero padding.
        """
        conv1 = self.groups[0].conv1.weight
        whiten = self.whiten.weight.to(conv1.dtype).transpose(0, 1).flip(2, 3)
        return F.conv2d(conv1, whiten, padding=1)  # PATCH - 1 (script reads no globals)

    @torch.jit.unused
    def whiten_gelu(self, x: torch.Tensor) -> torch.Tensor:
        return native.gelu(x)  # the kernel's GELU on bf16 CPU tensors (native.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_first:
            x = F.conv2d(x, self.folded_kernel(), padding=1)
            x = self.groups[0].after_conv1(x)
            x = self.groups[2](self.groups[1](x))
        elif self.whiten_act:
            x = self.whiten(x)
            if self.training and not torch.jit.is_scripting() and not torch.jit.is_tracing():
                x = self.whiten_gelu(x)
            else:
                x = F.gelu(x)
            x = self.groups(x)
        else:
            x = self.groups(self.whiten(x))
        # The global max-pool: adaptive_max_pool2d is the fastest on CPU (2x max_pool2d's
        # backward), but its CUDA backward is not deterministic (--deterministic refuses it)
        if x.is_cuda:
            x = F.max_pool2d(x, x.shape[2:]).flatten(1)
        else:
            x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) / x.shape[1]
