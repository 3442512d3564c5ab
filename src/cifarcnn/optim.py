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
