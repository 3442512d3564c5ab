"""The CPU kernels (native.py): fused max-pool, BatchNorm and GELU, the GELU alone and the
im2col filter gradient, against PyTorch's layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cifarcnn import native
from cifarcnn.models import build_model
from cifarcnn.models.fast import BatchNorm, im2col_filter_grad

CL = torch.channels_last


@pytest.fixture
def ext():
    module = native.extension()
    if module is None:
        pytest.skip("the fused kernels need an x86 CPU with AVX-512 and a C++ compiler")
    return module


@pytest.fixture
def stock(monkeypatch):
    """Run PyTorch's layers instead, as on a machine without the kernels."""
    def use() -> None:
        monkeypatch.setattr(native, "_ext", None)
        monkeypatch.setattr(native, "_tried", True)
    return use


def bf16_input(shape, seed=0):
    torch.manual_seed(seed)
    x = (torch.randn(shape) * 2 + 0.5).to(torch.bfloat16)
    x[:, :, 0, 0] = x[:, :, 0, 1]  # ties inside pooling windows
    x[0, :, 1, 1] = x[0, :, 0, 0]
    return x.contiguous(memory_format=CL)


def layers(x, bias, pool, fused):
    """Output, input gradient, bias gradient and running statistics, one way or the other."""
    norm = BatchNorm(x.shape[1], 0.4)
    norm.bias.data.copy_(bias)
    xi = x.clone().requires_grad_()
    y = native.pool_bn_gelu(xi, norm, pool) if fused else F.gelu(
        norm(F.max_pool2d(xi, 2) if pool else xi))
    torch.manual_seed(1)
    g = torch.randn(y.shape).to(y.dtype).contiguous(memory_format=CL)
    y.backward(g)
    return y, xi.grad, norm.bias.grad, norm.running_mean, norm.running_var, g


def reference(x, bias, g, pool):
    """The same layers in float64 from the same bf16 input: what both should approach."""
    xi = x.double().requires_grad_()
    p = F.max_pool2d(xi, 2) if pool else xi
    b = bias.double().requires_grad_()
    y = F.gelu(F.batch_norm(p, None, None, None, b, True, 0.0, 1e-12))
    y.backward(g.double())
    return y, xi.grad, b.grad


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(("shape", "pool"), [((16, 48, 31, 31), True), ((3, 37, 9, 8), True),
                                             ((5, 20, 7, 7), True), ((40, 19, 5, 6), False)])
def test_fused_layers_match_pytorchs_to_bf16_rounding(ext, shape, pool):
    x = bf16_input(shape)
    bias = torch.linspace(-1, 1, shape[1])
    y1, gx1, gb1, rm1, rv1, g = layers(x, bias, pool, fused=True)
    y0, gx0, gb0, rm0, rv0, _ = layers(x, bias, pool, fused=False)
    ry, rgx, rgb = reference(x, bias, g, pool)
    assert y1.dtype == gx1.dtype == torch.bfloat16 and gx1.shape == x.shape
    assert y1.is_contiguous(memory_format=CL) and gx1.is_contiguous(memory_format=CL)
    # fp32 arithmetic, rounded to bf16 where PyTorch's layers round too or less often: as
    # close to float64 as those layers, up to one bf16 step (2^-8) of the largest value
    for fused, torchs, ref in ((y1, y0, ry), (gx1, gx0, rgx), (gb1, gb0, rgb)):
        assert rel(fused, ref) <= max(1.5 * rel(torchs, ref), 2**-8)
    # the pool sends each gradient to the same element of its window, ties included
    assert torch.equal(gx1 == 0, gx0 == 0)
    # running statistics as nn.BatchNorm2d keeps them (unbiased variance, momentum 0.4)
    torch.testing.assert_close(rm1, rm0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv1, rv0, rtol=1e-4, atol=1e-6)


def test_the_gelu_alone_matches_pytorchs_to_bf16_rounding(ext):
    """Its rational GELU and GELU' (within 2e-6 of the exact ones), on every bf16 value from
    -8 to 8 and beyond: within a bf16 step of exact, and above z = -3 the same bf16 values
    as PyTorch's erf GELU but for rounding ties (below, where GELU is under 0.004 in size,
    the 2e-6 can move the last bit)."""
    x = torch.linspace(-8, 8, 100001).to(torch.bfloat16).unique()
    x = torch.cat([x, torch.tensor([-30.0, -6.0, 6.0, 30.0], dtype=torch.bfloat16)])
    g = torch.linspace(-3, 3, len(x)).to(torch.bfloat16)
    xd = x.double()
    cdf = 0.5 * (1 + torch.erf(xd / 2**0.5))
    want_y = xd * cdf
    want_gx = g.double() * (cdf + xd * torch.exp(-xd**2 / 2) / (2 * torch.pi) ** 0.5)
    x1, x0 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y0 = native.gelu(x1), F.gelu(x0)
    y1.backward(g)
    y0.backward(g)
    for ours, torchs, ref in ((y1, y0, want_y), (x1.grad, x0.grad, want_gx)):
        assert ours.dtype == torch.bfloat16
        # within one bf16 step (2^-8 relative) of the exact value, as PyTorch's are, or
        # within 1e-5 where GELU is that small (past |z| = 5.5 the kernel's CDF is 0 or 1)
        step = ref.abs() * 2**-8 + 1e-5
        assert ((ours.double() - ref).abs() <= step).all()
        assert ((ours.double() - ref).abs() <= (torchs.double() - ref).abs() + step).all()
        # above z = -3 (GELU > -0.004) the same bf16 value, but for a few rounding ties
        assert (ours != torchs)[x > -3].float().mean() < 0.01
    assert (y1[x < -4] <= 0).all()  # the far tail keeps GELU's sign
    # a NaN stays NaN both ways, and the kernel keeps a channels_last layout
    n = torch.tensor([float("nan"), 1.0], dtype=torch.bfloat16)
    assert native.gelu(n).isnan().tolist() == [True, False]
    z = bf16_input((2, 5, 4, 3))
    assert native.gelu(z).is_contiguous(memory_format=CL)
    assert torch.equal(native.gelu(z), ext.gelu_forward(z.contiguous()).contiguous(
        memory_format=CL))


def test_the_kernels_im2col_gives_the_python_versions_numbers(ext, stock):
    torch.manual_seed(0)
    cases = [((6, 7, 3, 3), 5, 1 << 20), ((5, 16, 7, 7), 9, 3 * 7 * 7 * 9 * 16 * 2),
             ((3, 4, 1, 1), 2, 1), ((2, 33, 5, 6), 8, 1 << 30)]
    for shape, out, chunk in cases:  # ragged last chunks, 1x1 maps, odd channel counts
        x = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=CL)
        g = torch.randn(shape[0], out, *shape[2:]).to(torch.bfloat16).contiguous(
            memory_format=CL)
        assert native.usable_for_im2col(g, x)
        ours = im2col_filter_grad(g, x, chunk)
        want = torch.ops.aten.convolution_backward(
            g.double(), x.double(), torch.zeros(out, shape[1], 3, 3, dtype=torch.float64), None,
            [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]
        torch.testing.assert_close(ours.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max())
        stock()  # the Python version: the same products, added in the same order
        assert torch.equal(im2col_filter_grad(g, x, chunk), ours)
        native._ext = ext
    assert not native.usable_for_im2col(g.float(), x.float())
    assert not native.usable_for_im2col(g, x.contiguous())


def test_the_int8_rounding_kernel_is_quantize_per_tensors_to_one_step_at_ties(ext, stock):
    """native quantize_u8 rounds x / scale + zero to nearest and clamps to [0, 255] in x's
    layout; int8.quantize takes it, and without it PyTorch's quantize_per_tensor, which
    differs only where x / scale sits on a tie (a product against a quotient)."""
    from cifarcnn import int8

    torch.manual_seed(0)
    for shape, dtype in (((6, 17, 5, 5), torch.float32), ((3, 8, 4, 7), torch.bfloat16),
                         ((37,), torch.float32)):
        x = (torch.randn(shape) * 3).to(dtype)
        x = x.contiguous(memory_format=CL) if x.dim() == 4 else x
        for symmetric in (True, False):
            q, scale, zero = int8.quantize(x, symmetric)
            assert q.dtype == torch.uint8 and q.stride() == x.stride()
            want = torch.clamp(torch.round(x.double() / scale) + zero, 0, 255)
            assert (q.double() - want).abs().max() <= 1
            assert (q.double() != want).float().mean() < 0.01
            stock()
            q0, *_ = int8.quantize(x, symmetric)
            native._ext = ext
            assert (q.int() - q0.int()).abs().max() <= 1
    # saturation at both ends, exact levels, zero kept at the zero point
    x = torch.tensor([-10.0, -1.0, 0.0, 0.5, 1.0, 10.0])
    assert ext.quantize_u8(x, 0.5, 4).tolist() == [0, 2, 4, 5, 6, 24]
    assert ext.quantize_u8(x, 0.01, 128).tolist() == [0, 28, 128, 178, 228, 255]
    with pytest.raises(RuntimeError, match="dense fp32 or bf16"):
        ext.quantize_u8(x.double(), 0.5, 4)


def test_the_stochastic_int8_rounding_is_unbiased_bounded_and_seeded(ext, stock):
    """int8.quantize_stochastic (native quantize_s8_stochastic, or PyTorch without it)
    rounds each x / scale down or up, up with probability its fraction: the mean level of
    a constant is the constant, where rounding to nearest would give 0 for all under half
    a step; levels stay in [-127, 127] in x's layout; a seed fixes them, whatever the
    threads; and the two paths agree in distribution."""
    from cifarcnn import int8

    x = torch.cat([torch.full((1 << 18,), 0.3), torch.full((1 << 18,), -2.7),
                   torch.tensor([127.0])])  # max|x| 127: one step is 1.0
    for path in ("native", "stock"):
        if path == "stock":
            stock()
        torch.manual_seed(0)
        q, scale = int8.quantize_stochastic(x)
        assert q.dtype == torch.int8 and scale == pytest.approx(1.0)
        low, high = q[: 1 << 18].float(), q[1 << 18:-1].float()
        assert set(low.unique().tolist()) == {0.0, 1.0}
        assert low.mean() == pytest.approx(0.3, abs=0.01)
        assert set(high.unique().tolist()) == {-3.0, -2.0}
        assert high.mean() == pytest.approx(-2.7, abs=0.01) and int(q[-1]) == 127
        torch.manual_seed(0)
        assert torch.equal(int8.quantize_stochastic(x)[0], q)  # the seed repeats it
        native._ext = ext
    g = (torch.randn(4, 16, 5, 5) * 3).contiguous(memory_format=CL)
    q, scale = int8.quantize_stochastic(g)
    assert q.stride() == g.stride() and int(q.abs().max()) <= 127
    assert ((q.float() * scale - g).abs() < scale * (1 + 1e-5)).all()  # within one step
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.quantize_s8_stochastic(x, 1.0, 7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ext.quantize_s8_stochastic(x, 1.0, 7), one)
    assert not torch.equal(ext.quantize_s8_stochastic(x, 1.0, 8), one)
    with pytest.raises(RuntimeError, match="dense fp32 or bf16"):
        ext.quantize_s8_stochastic(x.double(), 1.0, 7)


def test_a_constant_channel_and_a_nan_pass_through_as_pytorchs_do(ext):
    x = bf16_input((4, 16, 6, 6))
    x[:, 3] = 2.5  # variance 0: normalised to 0, GELU(bias)
    x[1, 5, 2, 2] = float("nan")
    y1, *_ = layers(x, torch.zeros(16), True, fused=True)
    y0, *_ = layers(x, torch.zeros(16), True, fused=False)
    assert torch.equal(y1[:, 3], y0[:, 3])
    assert torch.equal(y1.isnan(), y0.isnan())  # the NaN wins its window, then its channel


def test_without_the_kernels_the_layers_are_pytorchs(stock):
    stock()
    x = bf16_input((4, 16, 9, 9))
    y1, gx1, gb1, *_ = layers(x, torch.zeros(16), True, fused=True)
    y0, gx0, gb0, *_ = layers(x, torch.zeros(16), True, fused=False)
    assert torch.equal(y1, y0) and torch.equal(gx1, gx0) and torch.equal(gb1, gb0)


def test_only_training_on_bf16_channels_last_cpu_tensors_takes_the_kernels(ext):
    norm = BatchNorm(16, 0.4)
    x = bf16_input((4, 16, 8, 8))
    assert native.usable(x, norm)
    assert not native.usable(x.float(), norm)
    assert not native.usable(x.contiguous(), norm)
    assert not native.usable(x, BatchNorm(16, None))  # a cumulative average: PyTorch's
    assert not native.usable(x, norm.eval())


def test_a_fast_net_trains_as_closely_to_fp32_with_the_kernels_as_without(ext, stock):
    """One training step in bf16, each way, against the same step in fp32: the loss and
    every gradient as close with the fused layers as with PyTorch's."""
    def step(bf16: bool) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = build_model("fast", widths=[16, 32, 48]).to(memory_format=CL)
        x = torch.randn(64, 3, 32, 32).contiguous(memory_format=CL)
        y = torch.randint(0, 10, (64,))
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters() if p.grad is not None]

    loss_fused, grads_fused = step(bf16=True)
    stock()
    loss_torch, grads_torch = step(bf16=True)
    loss_ref, grads_ref = step(bf16=False)  # fp32: PyTorch's layers either way
    assert abs(loss_fused - loss_ref) <= 2 * abs(loss_torch - loss_ref) + 1e-3
    for fused, torchs, ref in zip(grads_fused, grads_torch, grads_ref, strict=True):
        assert (fused - ref).norm() <= 1.5 * (torchs - ref).norm() + 1e-3 * ref.norm()


def test_kernels_run_on_every_thread(ext):
    """Built without OpenMP, every at::parallel_for ran in one thread: the kernels used one
    of the machine's two cores, and nothing but a timing showed it."""
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert ext.parallel_threads() == threads
    finally:
        torch.set_num_threads(saved)


def test_cpu_support_is_read_from_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n")
    assert native.cpu_supported(info) == (native.platform.machine() in ("x86_64", "AMD64"))
    assert "-mavx512bf16" not in native.compile_flags(info)
    info.write_text("flags\t\t: avx512f avx512bw avx512vl avx512_bf16\n")
    assert "-mavx512bf16" in native.compile_flags(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert not native.cpu_supported(info)
    assert not native.cpu_supported(tmp_path / "missing")


def test_fast_step_benchmark_compares_the_kernels_site_by_site_and_step_by_step(ext):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fast_step.py"
    r = subprocess.run([sys.executable, str(script), "--widths", "8,16,16", "--batch", "8",
                        "--res", "16", "12", "--steps", "2", "--device", "cpu", "--native"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # two sites per group (whitening leaves 15x15 of 16: pooled to 7, then 3, then 1)
    assert any(line.split()[:3] == ["whiten", "gelu", "@15"] for line in lines)
    sites = [line.split() for line in lines if line.startswith("groups.")]
    assert [s[1] for s in sites] == ["pool+norm1+gelu", "norm2+gelu"] * 3
    assert [s[2] for s in sites[::2]] == ["@15", "@7", "@3"]
    assert all(float(v) > 0 for s in sites for v in s[3:])
    steps = {line.split()[0]: line.split()[1:] for line in lines
             if line.split() and line.split()[0] in ("16", "12")}
    assert set(steps) == {"16", "12"} and all(len(v) == 5 for v in steps.values())
    assert all(float(v) > 0 for v in steps["16"])


def test_the_kernels_gelu_constants_are_the_fit_scripts():
    """native.cpp's rational GELU constants are what scripts/fit_gelu.py fits, and the fits
    are as close as its comment says."""
    import importlib.util
    import re

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fit_gelu", root / "scripts" / "fit_gelu.py")
    fit_gelu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_gelu)
    source = (root / "src" / "cifarcnn" / "native.cpp").read_text()
    for name, f, num, den in fit_gelu.FITS:
        err, p, q = fit_gelu.fit(f, num, den)
        assert err < 2e-6
        for part, want in (("P", p), ("Q", q)):
            body = re.search(rf"{name}_{part}\[\] = \{{([^}}]*)\}}", source).group(1)
            have = [float(v.strip().rstrip("f")) for v in body.split(",")]
            assert have == pytest.approx(list(want), rel=1e-5, abs=1e-12)
