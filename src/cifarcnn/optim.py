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

# Quintic Newton-Schulz coefficients tuned for speed over exactness (Jordan, 2024): three
# iterations push every singular value into roughly [0.7, 1.2], which trains as well as
# an exact orthogonalisation at a fraction of the cost.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (g 2-D), in bf16 where the device runs it natively."""
    a, b, c = NS_COEFFS
    dtype = torch.bfloat16 if g.device.type in ("cuda", "cpu") else torch.float32
    x = g.to(dtype)
    x = x / (x.norm() + eps)  # all singular values <= 1: inside the iteration's basin
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T  # the small Gram matrix: cost rows^2 x cols
        x = a * x + (b * s + c * (s @ s)) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Groups with `muon=True` take orthogonalised Nesterov steps; the others Nesterov SGD.

    SGD groups follow torch.optim.SGD's convention (weight decay is added to
    the gradient; tested equal to torch's Nesterov SGD). Muon groups take no
    weight decay: the norm reset already bounds the filters.
    """

    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 0.0, muon: bool = False,
                 ns_steps: int = 3) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "muon": muon, "ns_steps": ns_steps}
        super().__init__(params, defaults)

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
                for p, g, buf in zip(params, grads, bufs, strict=True):
                    buf.mul_(mom).add_(g)
                    u = g.add(buf, alpha=mom)  # Nesterov look-ahead
                    p.mul_(len(p) ** 0.5 / p.norm())
                    p.add_(orthogonalize(u.reshape(len(u), -1), group["ns_steps"]).view_as(p),
                           alpha=-lr)
            else:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads)
                updates = torch._foreach_add(grads, bufs, alpha=mom)
                torch._foreach_add_(params, updates, alpha=-lr)
        return None
