"""MuonSGD: orthogonalised updates for conv filters, Nesterov SGD for everything else.

Muon (Keller Jordan, 2024) replaces a filter bank's momentum update by the
nearest semi-orthogonal matrix, computed with a few Newton-Schulz
iterations: every direction of the update then moves at the same speed,
which lets a short schedule make as much progress as a long SGD one. The
filters' norm is reset to sqrt(out_channels) before each step: the BatchNorm
that follows every conv makes the layer blind to that norm, so fixing it
keeps the effective step size under the learning rate's control.

One optimizer object with a `muon` flag per parameter group, rather than
two optimizers, so checkpoints, schedules and DDP see one thing.
torch.optim.Muon exists but only takes 2-D parameters and does not
renormalise; conv filters are 4-D, hence this small class.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# absolute: benchmarks/muon_step.py loads a copy of this file on its own, as a baseline
from cifarcnn.config import cpu_bf16_pays

# Quintic Newton-Schulz coefficients tuned for speed over exactness (Jordan, 2024): three
# iterations push every singular value into roughly [0.7, 1.2], which trains as well as
# an exact orthogonalisation at a fraction of the cost.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def ns_dtype(device: torch.device) -> torch.dtype:
    """The iteration's dtype: bf16 where the device multiplies it faster than fp32 (a GPU, a
    CPU with AMX or AMD's AVX512-BF16: `config.cpu_bf16_pays`), else fp32. On an AVX2-only
    AMD EPYC, PyTorch's emulated bf16 products ran ~50x slower than fp32's, and the
    iteration took ~1.5 s of a 2 s step; on an Intel Xeon without AMX they ran at half."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_pays()):
        return torch.bfloat16
    return torch.float32


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (g 2-D), in bf16 where the device runs it natively."""
    a, b, c = NS_COEFFS
    x = g.to(ns_dtype(g.device))
    x = x / (x.norm() + eps)  # all singular values <= 1: inside the iteration's basin
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T  # the small Gram matrix: cost rows^2 x cols
        # a x + (b s + c s s) x as two fused multiply-adds: 3 kernels per iteration, not 8,
        # which matters where launching kernels is the step's bottleneck (a GPU's small nets)
        x = torch.addmm(x, torch.addmm(s, s, s, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


def orthogonalize_stacked(gs: list[torch.Tensor], steps: int = 3,
                          eps: float = 1e-7) -> list[torch.Tensor]:
    """orthogonalize() of each 2-D tensor, all in one batch of zero-padded matrices.

    For a GPU, where a small net's step is bound by kernel launches rather than
    arithmetic: the iteration's 9 kernels run once for all filter banks instead
    of once per bank. Zero padding changes nothing: a block [[A, 0], [0, 0]]
    stays that shape through every product of the iteration, and the norm
    ignores zeros. On a CPU the padding's extra FLOPs cost more than the
    launches saved, so MuonSGD uses this on CUDA only.
    """
    a, b, c = NS_COEFFS
    dtype = ns_dtype(gs[0].device)
    tall = [g.size(0) > g.size(1) for g in gs]
    mats = [g.T if t else g for g, t in zip(gs, tall, strict=True)]
    rows, cols = max(m.size(0) for m in mats), max(m.size(1) for m in mats)
    x = torch.zeros(len(mats), rows, cols, dtype=dtype, device=gs[0].device)
    for i, m in enumerate(mats):
        x[i, :m.size(0), :m.size(1)] = m
    x = x / (torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(s, s, s, beta=b, alpha=c), x, beta=a)
    out = [x[i, :m.size(0), :m.size(1)] for i, m in enumerate(mats)]
    return [(o.T if t else o).to(g.dtype) for o, t, g in zip(out, tall, gs, strict=True)]


class MuonSGD(torch.optim.Optimizer):
    """Groups with `muon=True` take orthogonalised Nesterov steps; the others Nesterov SGD.

    SGD groups follow torch.optim.SGD's convention (weight decay is added to
    the gradient; tested equal to torch's Nesterov SGD). Muon groups take no
    weight decay: the norm reset already bounds the filters. `stacked` picks
    orthogonalize_stacked (one batch for all filter banks) over one
    orthogonalize per bank; None, the default, stacks on CUDA only, where
    benchmarks/muon_step.py measured it 1.9x faster (on the CPU slower).
    """

    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 0.0, muon: bool = False,
                 ns_steps: int = 3, stacked: bool | None = None) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "muon": muon, "ns_steps": ns_steps}
        super().__init__(params, defaults)
        self.stacked = stacked

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            grads = [p.grad for p in params]
            if group["muon"]:
                # the element-wise work as one foreach kernel per operation over all filters
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads)
                updates = torch._foreach_add(grads, bufs, alpha=mom)  # Nesterov look-ahead
                norms = torch._foreach_norm(params)
                torch._foreach_reciprocal_(norms)
                torch._foreach_mul_(norms, [len(p) ** 0.5 for p in params])
                torch._foreach_mul_(params, norms)
                flat = [u.reshape(len(u), -1) for u in updates]
                stack = flat[0].is_cuda if self.stacked is None else self.stacked
                if stack:
                    ortho = orthogonalize_stacked(flat, group["ns_steps"])
                else:
                    ortho = [orthogonalize(f, group["ns_steps"]) for f in flat]
                steps = [o.reshape(u.shape) for o, u in zip(ortho, updates, strict=True)]
                torch._foreach_add_(params, steps, alpha=-lr)
            else:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads)
                updates = torch._foreach_add(grads, bufs, alpha=mom)
                torch._foreach_add_(params, updates, alpha=-lr)
        return None


class Lookahead:
    """Slow weights that the trained ("fast") ones restart from every `every` steps.

    Lookahead (Zhang et al., 2019), in the form short CIFAR-10 recipes use:
    each update the slow copy moves toward the fast weights by 1 - d and the
    fast weights jump back to it, with d = decay**every * progress**3, so it
    does nothing early (d near 0: the slow copy just follows) and averages
    away more of the steps' noise as the learning rate falls. `finish` hands
    the model the slow weights. BatchNorm's running statistics are averaged
    with the weights they belong to. Works on the model's state_dict tensors
    in place, so optimizers, DDP and the execution modes see nothing change.
    """

    def __init__(self, model: torch.nn.Module, every: int, decay: float,
                 total_steps: int) -> None:
        self.every, self.decay, self.total = every, decay, max(1, total_steps)
        self.tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call after global step `step` (counted from 1)."""
        if step % self.every:
            return
        d = self.decay ** self.every * (step / self.total) ** 3
        torch._foreach_lerp_(self.slow, self.tensors, 1.0 - d)
        torch._foreach_copy_(self.tensors, self.slow)

    @torch.no_grad()
    def finish(self) -> None:
        torch._foreach_copy_(self.tensors, self.slow)

    def state_dict(self) -> list[torch.Tensor]:
        return self.slow

    def load_state_dict(self, slow: list[torch.Tensor]) -> None:
        for mine, saved in zip(self.slow, slow, strict=True):
            mine.copy_(saved)
