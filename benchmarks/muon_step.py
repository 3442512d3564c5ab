"""The MuonSGD step alone and a whole training step, per way of orthogonalising.

    python benchmarks/muon_step.py [--device cuda] [--widths 48,192,256] [--batch 500]
        [--baseline OLD_OPTIM_PY]

On a GPU a small net's step is bound by kernel launches, and Muon's
Newton-Schulz iterations, run once per filter bank, were most of them. This
times the optimizer's step with one orthogonalisation per bank
(`per-matrix`, MuonSGD's CPU default) and with all banks in one zero-padded
batch (`stacked`, its CUDA default), and a whole step (forward, backward,
optimizer) with each. --baseline adds the MuonSGD class of another optim.py
(e.g. `git show ad30edb:src/cifarcnn/optim.py > /tmp/optim_old.py`) as a
third row. Random images: speed does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from fast_step import widths_arg

from cifarcnn import perf
from cifarcnn.config import amp_dtype, resolve_device, resolve_precision
from cifarcnn.models import build_model
from cifarcnn.optim import MuonSGD


def best_ms(fn: Callable[[], None], device: str, steps: int, repeats: int = 3) -> float:
    """Best mean milliseconds per call over `repeats` runs of `steps` back-to-back calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: allocations, cuBLAS handles
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()  # back-to-back, as in training: the host may run ahead of the GPU
        best = min(best, (time.perf_counter() - t0) / steps * 1e3)
    return best


def timings(make_opt: Callable[[list[dict]], torch.optim.Optimizer], widths: tuple[int, ...],
            batch: int, device: str, steps: int) -> tuple[float, float]:
    """(ms per optimizer step alone, ms per whole training step)."""
    torch.manual_seed(0)
    model = build_model("fast", widths=list(widths)).to(device).to(
        memory_format=torch.channels_last)
    opt = make_opt(model.optimizer_groups(batch, 0.24))
    dtype = amp_dtype(resolve_precision("auto", device))
    x = torch.randn(batch, 3, 32, 32, device=device).to(
        dtype or torch.float32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def backward() -> None:
        with torch.autocast(device, dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def whole() -> None:
        backward()
        opt.step()

    backward()
    return best_ms(opt.step, device, steps), best_ms(whole, device, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--widths", type=widths_arg, default=(48, 192, 256))
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per timing (default 40 on CUDA, 3 on a CPU)")
    ap.add_argument("--baseline", help="another optim.py whose MuonSGD to time as well")
    a = ap.parse_args()
    perf.tune_allocator()  # as the training loop does (CIFARCNN_NO_MALLOPT=1: off)
    device = resolve_device(a.device)
    steps = a.steps or (40 if device == "cuda" else 3)
    variants: dict[str, Callable[[list[dict]], torch.optim.Optimizer]] = {
        "per-matrix": lambda groups: MuonSGD(groups, stacked=False),
        "stacked": lambda groups: MuonSGD(groups, stacked=True),
    }
    if a.baseline:
        spec = importlib.util.spec_from_file_location("baseline_optim", a.baseline)
        if not Path(a.baseline).is_file() or spec is None or spec.loader is None:
            ap.error(f"--baseline {a.baseline}: no such Python file (make one with "
                     "`git show COMMIT:src/cifarcnn/optim.py > FILE`)")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        variants[f"baseline ({a.baseline})"] = module.MuonSGD
    print(f"{'orthogonalisation':<32} {'optimizer ms':>12} {'whole step ms':>13}")
    for name, make_opt in variants.items():
        opt_ms, step_ms = timings(make_opt, a.widths, a.batch, device, steps)
        print(f"{name:<32} {opt_ms:>12.2f} {step_ms:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
