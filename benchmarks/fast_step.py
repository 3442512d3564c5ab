"""Where the fast recipe's time goes: one training step per configuration, timed.

    python benchmarks/fast_step.py [--widths 48,192,256 64,256,256] [--batch 500]
        [--res 32 24] [--model-arg KEY=VALUE] [--frozen-whiten] [--compile] [--profile]
        [--matmul] [--layers] [--native] [--device cpu] [--precision auto|fp32|bf16]

A step is what the training loop does per batch: forward and backward under
autocast (bf16 on a CPU that has it, else fp32: --precision auto, as in training),
channels_last, then a MuonSGD step, on random
images (speed does not depend on the pixels), with the training loop's
allocator settings (cifarcnn.perf). Prints ms per step, images/s
and the seconds one 50,000-image epoch takes at that rate; --model-arg passes
a model argument (e.g. whiten_act=false), --frozen-whiten times the steps
after the whitening bias stops training (the recipe's epochs 4 on, where the
backward pass ends at the first conv's filters); --compile adds a
torch.compile row per configuration (its compile time apart); --profile
prints the operators' shares of one configuration's time; the page faults per
step and the resident memory show what the allocator settings do; --matmul first
times large square matrix products in the autocast dtype, the ceiling the
convolutions can be compared with; --layers times each conv of the first
configuration on its own: forward, input gradient and filter gradient, with
the rate each reaches (counted by the filter taps inside the image, as oneDNN
skips the ones on the zero padding), and the filter gradient as the matrix
products the model takes on small maps (`im2col_filter_grad`, gemm_grad_positions);
--native times the fused max-pool, BatchNorm and GELU kernels (cifarcnn/native.py)
against PyTorch's layers, site by site and then as whole steps of the first widths
and batch at each --res, the two alternating step by step so the machine's swings
hit both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cifarcnn import native, perf
from cifarcnn.cli import parse_model_args
from cifarcnn.config import amp_dtype, resolve_device, resolve_precision
from cifarcnn.errors import CifarError
from cifarcnn.models import build_model
from cifarcnn.models.fast import BatchNorm, ConvGroup, im2col_filter_grad
from cifarcnn.optim import MuonSGD


def minor_faults() -> int:
    """Page faults this process has taken so far (memory mapped in anew, not read from disk)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def resident_mib() -> float:
    """This process's resident memory now (Linux), or its peak elsewhere."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * resource.getpagesize() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_step(widths: tuple[int, ...], batch: int, res: int, device: str, compiled: bool,
              model_args: dict | None = None, frozen_whiten: bool = False,
              precision: str = "auto") -> Callable[[], None]:
    """One training step of a fresh model on a fixed random batch, as a function."""
    model = build_model("fast", widths=list(widths), **(model_args or {})).to(device).to(
        memory_format=torch.channels_last)
    if frozen_whiten and model.whiten.bias is not None:
        model.whiten.bias.requires_grad_(False)
    opt = MuonSGD([g for g in model.optimizer_groups(batch, 0.24)
                   if any(p.requires_grad for p in g["params"])])
    net = torch.compile(model) if compiled else model
    dtype = amp_dtype(resolve_precision(precision, device))
    x = torch.randn(batch, 3, res, res, device=device).to(
        dtype or torch.float32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def one() -> None:
        with torch.autocast(device, dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y, label_smoothing=0.2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return one


def step_time(widths: tuple[int, ...], batch: int, res: int, device: str, compiled: bool,
              steps: int, model_args: dict | None = None,
              frozen_whiten: bool = False, precision: str = "auto"
              ) -> tuple[float, float, float]:
    """(best seconds per step, one-time compile seconds, page faults per timed step)."""
    one = make_step(widths, batch, res, device, compiled, model_args, frozen_whiten, precision)
    t0 = time.perf_counter()
    one()
    first = time.perf_counter() - t0
    one()
    times = []
    faults = minor_faults()
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return best, (first - best) if compiled else 0.0, (minor_faults() - faults) / steps


def matmul_tflops(n: int, device: str, dtype: torch.dtype, steps: int) -> float:
    """Best TFLOP/s of an n x n by n x n product: what the machine's GEMM reaches."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(steps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def inside_taps(size: int, kernel: int = 3) -> int:
    """Filter taps of a same-padded conv that fall inside a size x size image."""
    half = kernel // 2
    per_axis = sum(min(size - 1, i + half) - max(0, i - half) + 1 for i in range(size))
    return per_axis * per_axis


def conv_times(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
               steps: int) -> list[float]:
    """Best seconds of a same-padded 3x3 conv's forward, input gradient (from output
    gradient g), filter gradient and that gradient by `im2col_filter_grad`, each alone."""
    def backward(mask: list[bool]) -> None:
        torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                            [0, 0], 1, mask)

    times = []
    for fn in (lambda: F.conv2d(x, w, padding=1), lambda: backward([True, False, False]),
               lambda: backward([False, True, False]), lambda: im2col_filter_grad(g, x)):
        best = float("inf")
        for _ in range(steps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            fn()
            if x.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    return times


def layer_times(widths: tuple[int, ...], batch: int, res: int, device: str, steps: int,
                model_args: dict | None = None, precision: str = "auto"
                ) -> list[tuple[str, float, float, float, float, int]]:
    """Per conv of the groups: (name, forward s, input-gradient s, filter-gradient s,
    im2col filter-gradient s, multiply-adds inside the image), each the best of
    `steps` on random tensors."""
    model = build_model("fast", widths=list(widths), **(model_args or {})).to(device)
    dtype = amp_dtype(resolve_precision(precision, device)) or torch.float32
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):  # a hook that returns None leaves the output alone
        return lambda mod, inp, out: shapes.__setitem__(name, tuple(inp[0].shape))

    hooks = [m.register_forward_hook(record(name))
             for name, m in model.groups.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(2, 3, res, res, device=device))
    for h in hooks:
        h.remove()
    cl = torch.channels_last
    rows = []
    for name, m in model.groups.named_modules():
        if name not in shapes:
            continue
        _, cin, size, _ = shapes[name]
        x = torch.randn(batch, cin, size, size, device=device, dtype=dtype).contiguous(
            memory_format=cl)
        w = m.weight.detach().to(dtype).contiguous(memory_format=cl)
        g = torch.randn(batch, m.out_channels, size, size, device=device,
                        dtype=dtype).contiguous(memory_format=cl)
        times = conv_times(x, w, g, steps)
        macs = batch * inside_taps(size) * cin * m.out_channels
        rows.append((f"{name} {cin}->{m.out_channels} @{size}", *times, macs))
    return rows


def best_of(fn: Callable[[], object], steps: int) -> float:
    """Best seconds of `steps` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def native_site_times(widths: tuple[int, ...], batch: int, res: int, steps: int
                      ) -> list[tuple[str, float, float]]:
    """Per site: (name, PyTorch's layers s, the kernels s) for forward and backward of the
    whitening layer's GELU, "max-pool, BatchNorm, GELU" after each group's first conv and
    "BatchNorm, GELU" after each second one, best of `steps`, on random bf16
    channels_last tensors."""
    model = build_model("fast", widths=list(widths))
    rows = []
    w = model.whiten.out_channels, res - 1  # the 2x2 whitening conv, no padding
    xw = torch.randn(batch, w[0], w[1], w[1]).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    gw = torch.randn_like(xw)

    def whiten_gelu() -> None:
        native.gelu(xw).backward(gw)

    with native.turned_off():
        plain = best_of(whiten_gelu, steps)
    rows.append((f"whiten gelu @{w[1]}", plain, best_of(whiten_gelu, steps)))
    sizes: list[tuple[int, int]] = []  # (channels, size) of each first conv's output
    hooks = [g.conv1.register_forward_hook(
        lambda mod, inp, out: sizes.append((out.shape[1], out.shape[2])))
        for g in model.groups if isinstance(g, ConvGroup)]
    with torch.no_grad():
        model(torch.randn(2, 3, res, res))
    for h in hooks:
        h.remove()
    for i, (c, size) in enumerate(sizes):
        for pool, name in ((True, f"groups.{i} pool+norm1+gelu @{size}"),
                           (False, f"groups.{i} norm2+gelu @{size // 2}")):
            s = size if pool else size // 2
            x = torch.randn(batch, c, s, s).to(torch.bfloat16).contiguous(
                memory_format=torch.channels_last).requires_grad_()
            norm = BatchNorm(c, 0.4)
            out = s // 2 if pool else s
            g = torch.randn(batch, c, out, out).to(torch.bfloat16).contiguous(
                memory_format=torch.channels_last)

            def run(x=x, norm=norm, g=g, pool=pool) -> None:
                native.pool_bn_gelu(x, norm, pool).backward(g)

            with native.turned_off():
                plain = best_of(run, steps)
            rows.append((name, plain, best_of(run, steps)))
    return rows


def native_step_pairs(widths: tuple[int, ...], batch: int, res: int, steps: int,
                      model_args: dict | None, frozen_whiten: bool
                      ) -> tuple[list[float], list[float]]:
    """Whole steps of one model, alternating PyTorch's layers and the kernels (at every
    site they serve): the machine's swings hit both alike."""
    one = make_step(widths, batch, res, "cpu", False, model_args, frozen_whiten)
    plain, fused = [], []
    for i in range(steps + 1):  # the first pair warms up
        for times, off in ((plain, True), (fused, False)):
            with native.turned_off() if off else contextlib.nullcontext():
                t0 = time.perf_counter()
                one()
                if i:
                    times.append(time.perf_counter() - t0)
    return plain, fused


def widths_arg(text: str) -> tuple[int, int, int]:
    """'48,192,256' -> (48, 192, 256): the three groups' widths."""
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 3 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give three positive widths, e.g. 48,192,256")
    return widths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="+", type=widths_arg,
                    default=[(48, 192, 256), (64, 256, 256), (32, 128, 256)])
    ap.add_argument("--batch", nargs="+", type=int, default=[500])
    ap.add_argument("--res", nargs="+", type=int, default=[32, 24])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="model constructor argument, VALUE in JSON (repeatable)")
    ap.add_argument("--frozen-whiten", action="store_true",
                    help="the whitening bias no longer trains (the recipe from epoch 4)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--profile", action="store_true",
                    help="operator shares of the first configuration")
    ap.add_argument("--matmul", action="store_true",
                    help="also time square matrix products (the GEMM ceiling)")
    ap.add_argument("--layers", action="store_true",
                    help="time each conv of the first configuration: forward and gradients")
    ap.add_argument("--native", action="store_true",
                    help="the fused pool/BatchNorm/GELU kernels against PyTorch's layers: per "
                         "site, and whole steps of the first widths and batch, interleaved")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="as the training loop's: auto is bf16 where the CPU multiplies it faster "
                         "than fp32 (a timed probe), else fp32")
    a = ap.parse_args()
    try:
        model_args = parse_model_args(a.model_arg)
    except CifarError as e:
        ap.error(str(e))
    perf.tune_allocator()  # as the training loop does (CIFARCNN_NO_MALLOPT=1: off)
    device = resolve_device(a.device)
    if a.matmul:
        dtype = amp_dtype(resolve_precision(a.precision, device)) or torch.float32
        for n in (1024, 2048, 4096):
            print(f"matmul {n}x{n} {str(dtype).removeprefix('torch.')}: "
                  f"{matmul_tflops(n, device, dtype, a.steps):.2f} TFLOP/s", flush=True)
    print(f"{'widths':<12} {'batch':>5} {'res':>4} {'mode':<8} {'ms/step':>8} {'img/s':>7} "
          f"{'s/epoch':>8} {'compile s':>9} {'faults/step':>11} {'RSS MiB':>8}")
    for widths in a.widths:
        w = ",".join(map(str, widths))
        for batch in a.batch:
            for res in a.res:
                for compiled in (False, True) if a.compile else (False,):
                    t, setup, faults = step_time(widths, batch, res, device, compiled, a.steps,
                                                 model_args, a.frozen_whiten, a.precision)
                    print(f"{w:<12} {batch:>5} {res:>4} {'compile' if compiled else 'eager':<8} "
                          f"{t * 1e3:>8.1f} {batch / t:>7.0f} {50_000 / batch * t:>8.1f} "
                          f"{setup:>9.1f} {faults:>11.0f} {resident_mib():>8.0f}", flush=True)
    if a.layers:
        print(f"\n{'conv':<24} {'fwd ms':>7} {'TF/s':>5} {'dinput':>7} {'TF/s':>5} "
              f"{'dweight':>7} {'TF/s':>5} {'im2col':>7} {'TF/s':>5}")
        for name, *times, macs in layer_times(a.widths[0], a.batch[0], a.res[0], device,
                                               a.steps, model_args, a.precision):
            cells = " ".join(f"{t * 1e3:>7.2f} {2 * macs / t / 1e12:>5.2f}" for t in times)
            print(f"{name:<24} {cells}", flush=True)
    if a.native and device == "cpu":
        if native.extension() is None:
            print("\nthe fused kernels are not available here (native.py)")
        else:
            print(f"\n{'site (forward and backward)':<32} {'torch ms':>8} {'fused ms':>8}")
            for name, plain, fused in native_site_times(a.widths[0], a.batch[0], a.res[0],
                                                        a.steps):
                print(f"{name:<32} {plain * 1e3:>8.2f} {fused * 1e3:>8.2f}", flush=True)
            print(f"\n{'step, res':<10} {'torch best':>10} {'median':>7} {'fused best':>10} "
                  f"{'median':>7} {'fused/torch, pair median':>24}")
            for res in a.res:
                plain, fused = native_step_pairs(a.widths[0], a.batch[0], res, a.steps,
                                                 model_args, a.frozen_whiten)
                ratio = statistics.median(f / p for p, f in zip(plain, fused, strict=True))
                print(f"{res:<10} {min(plain) * 1e3:>10.1f} {statistics.median(plain) * 1e3:>7.1f}"
                      f" {min(fused) * 1e3:>10.1f} {statistics.median(fused) * 1e3:>7.1f}"
                      f" {ratio:>24.3f}", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        # on a GPU also the kernels' own time: far below the step's wall time means the
        # step is bound by launches and Python, not by the GPU's arithmetic
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda"
                                               else [])
        with profile(activities=activities) as prof:
            step_time(a.widths[0], a.batch[0], a.res[0], device, False, 2, model_args,
                      a.frozen_whiten, a.precision)
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=12))
        if device == "cuda":
            print(table.table(sort_by="self_device_time_total", row_limit=12))


if __name__ == "__main__":
    main()
