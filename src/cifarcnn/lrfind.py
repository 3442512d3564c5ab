"""`cifarcnn lr-find`: the learning-rate range test, for choosing --lr on new data.

Train from the run's own start (model, initialisation, optimizer, batches and
augmentation as `train` would) for a few dozen steps while the rate `--lr`
sets grows geometrically, from `start` to `end` times --lr; the
loss, smoothed, falls while the rate is small enough for progress, bottoms out,
then climbs or blows up. Near its lowest point is the largest rate that still
makes progress, where a one-cycle schedule's peak goes (Smith, "Cyclical
Learning Rates for Training Neural Networks", 2017, and "A disciplined
approach to neural network hyper-parameters", 2018; fastai's `lr_find`
popularised the test). The steepest fall is not reported: in a test this
short a fresh net's loss falls fastest at the first, smallest rates, at any
rate (its initial logits shrink), which says nothing about the rate. A
model's recipe already holds a measured rate for CIFAR-10; the test is for
other data, other batch sizes, fine-tuning.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import augment, perf
from .config import TrainConfig
from .datasets import MEAN, STD, CifarData, load_cifar10
from .errors import CifarError
from .inference import autocast, input_dtype
from .models import build_model
from .train import init_from_data, make_optimizer, split_data
from .weights import init_from_weights

SMOOTHING = 0.9  # the loss's exponential average over steps: one batch's loss is noisy
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its lowest


def check_range(steps: int, start: float, end: float) -> None:
    if steps < 10:
        raise CifarError(f"--steps {steps}: give at least 10 steps to see a trend")
    if not (math.isfinite(start) and math.isfinite(end) and 0 < start < end):
        raise CifarError(f"--start {start} --end {end}: give multiples of --lr with "
                         "0 < start < end, e.g. --start 0.001 --end 10")


def lr_range_test(cfg: TrainConfig, data: CifarData | None = None, steps: int = 100,
                  start: float = 1e-3, end: float = 10.0,
                  log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the test; returns every step's rate and loss, and "lowest_lr", the rate at
    which the smoothed loss was lowest (see the module's docstring); "diverged_lr", the
    rate at which it blew up, where it did.

    Each step's rate is `--lr` x the step's multiple, in every parameter group whose
    rate --lr sets (in proportion); groups with rates of their own (the fast net's
    biases and head, per-image SGD rates) keep them, as `train --lr` would.
    """
    check_range(steps, start, end)
    perf.tune_allocator()  # as train does: glibc's defaults cost ~2x a step on CPU
    cfg = cfg.resolved()
    device, precision = cfg.device, cfg.precision
    if data is None:
        data = load_cifar10(cfg.data, cfg.download, skip_bad_images=cfg.skip_bad_images,
                            verbose=True)
    x_np, y_np = split_data(data, cfg)["train"]
    torch.manual_seed(cfg.seed)
    cfg.model_kwargs.setdefault("num_classes", len(data.classes))
    model = build_model(cfg.model, **cfg.model_kwargs)
    if cfg.init_from:
        init_from_weights(model, cfg.init_from, data.classes)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x_train = torch.from_numpy(x_np).to(device)
    y_train = torch.from_numpy(y_np).to(device)
    mean, std = torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)
    init_from_data(model, x_train, cfg, mean, std)
    opt = make_optimizer(model, cfg, cfg.batch_size)
    scales = set_by_lr(model, cfg, opt)
    base = [group["lr"] for group in opt.param_groups]
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    padded = augment.pad_images(x_train, cfg.translate, cfg.pad_mode)
    n, bs = len(y_train), min(cfg.batch_size, len(y_train))
    per_epoch = n // bs  # whole batches only: a short one would be a noisier loss
    in_dtype = input_dtype(precision)
    model.train()
    points: list[dict[str, float]] = []
    average, lowest, stopped = 0.0, math.inf, False
    for t in range(steps):
        multiple = start * (end / start) ** (t / (steps - 1))
        for group, rate, scaled in zip(opt.param_groups, base, scales, strict=True):
            group["lr"] = rate * multiple if scaled else rate
        epoch, s = divmod(t, per_epoch)
        if s == 0:
            plan = augment.epoch_plan(n, cfg.seed, epoch, cfg.augment, cfg.translate, cfg.flip)
            order, dx, dy, flip = (v.to(device) for v in
                                   (plan.order, plan.dx, plan.dy, plan.flip))
        sl = slice(s * bs, (s + 1) * bs)
        idx = order[sl]
        x = augment.crop_flip(padded, idx, dx[sl], dy[sl], flip[sl], 32)
        x = augment.normalize(x, mean, std, cfg.channels_last, in_dtype)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        value = float(loss.detach())  # a host sync per step: a measurement, not a run
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        smoothed = average / (1 - SMOOTHING ** (t + 1))  # without the average's start bias
        points.append({"step": t + 1, "multiple": multiple, "lr": cfg.lr * multiple,
                       "loss": value, "smoothed": smoothed})
        if t % max(1, steps // 10) == 0 or t == steps - 1:
            log(f"  step {t + 1:>4}  --lr {cfg.lr * multiple:<10.4g} loss {value:8.4f}  "
                f"smoothed {smoothed:8.4f}")
        if not math.isfinite(smoothed) or smoothed > DIVERGED * lowest:
            stopped = True
            log(f"  stopped at step {t + 1}: the loss diverged")
            break
        lowest = min(lowest, smoothed)
    return {"model": cfg.model, "optimizer": cfg.optimizer, "batch_size": bs,
            "recipe_lr": cfg.lr, "steps": len(points),
            "lowest_lr": lowest_rate(points),
            "diverged_lr": points[-1]["lr"] if stopped else None, "points": points}


def set_by_lr(model: torch.nn.Module, cfg: TrainConfig,
              opt: torch.optim.Optimizer) -> list[bool]:
    """Per parameter group of `opt`: does --lr set its rate? Asked of the optimizer
    itself: built again at twice the rate, these are the groups whose rate doubles (an
    optimizer holds no state before its first step, so the second costs nothing)."""
    doubled = make_optimizer(model, dataclasses.replace(cfg, lr=2 * cfg.lr), cfg.batch_size)
    return [math.isclose(b["lr"], 2 * a["lr"]) for a, b in
            zip(opt.param_groups, doubled.param_groups, strict=True)]


def lowest_rate(points: list[dict[str, float]]) -> float | None:
    """The rate at the smoothed loss's lowest point, the first tenth of the steps passed
    over (the average is still settling there, and a fresh net's loss falls at any
    rate); None for a test too short to say."""
    rest = [p for p in points[max(2, len(points) // 10):] if math.isfinite(p["smoothed"])]
    return min(rest, key=lambda p: p["smoothed"])["lr"] if len(rest) >= 3 else None


def plot(r: dict[str, Any], path: Path) -> None:
    """The smoothed loss against the rate on a log axis, the two suggestions marked."""
    from .report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lrs = [p["lr"] for p in r["points"]]
    ax.plot(lrs, [p["loss"] for p in r["points"]], color="0.75", lw=1, label="loss")
    ax.plot(lrs, [p["smoothed"] for p in r["points"]], color="C0", lw=2, label="smoothed")
    if r["lowest_lr"] is not None:
        ax.axvline(r["lowest_lr"], color="C3", ls="--",
                   label=f"lowest loss: {r['lowest_lr']:.3g}")
    ax.axvline(r["recipe_lr"], color="0.3", ls=":", label=f"recipe: {r['recipe_lr']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("--lr")
    ax.set_ylabel("training loss")
    ax.set_title(f"{r['model']}: learning-rate range test, batch {r['batch_size']}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CifarError(f"--plot {path}: cannot write ({e.strerror or e})") from None
    finally:
        plt.close(fig)
