"""The training loop: `train(config)` -> summary, writing a run directory as it goes.

Per step: gather-crop-flip a batch from the resident uint8 split, normalise,
forward under autocast, backward, optimizer and schedule step. Loss and
accuracy are summed on the device and read once per epoch, so the step
loop never waits on the host. Validation uses the same `evaluate_arrays` as
`cifarcnn evaluate`, which is why a reload reproduces its accuracy exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import augment, perf
from .config import TrainConfig
from .datasets import MEAN, STD, CifarData, balanced_subset, load_cifar10
from .errors import CifarError
from .inference import autocast, evaluate_arrays
from .models import build_model, count_parameters
from .weights import save_weights

HOLDOUT_SEED = 1234  # fixed: the same --holdout N always holds out the same images


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights only: decaying biases (and norm scales) only costs accuracy."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LR multiplier per step: linear warm-up from 0.1x, then linear (onecycle) or cosine to 0."""
    total = cfg.epochs * steps_per_epoch
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warm:
            return 0.1 + 0.9 * step / warm
        t = (step - warm) / max(1, total - warm)
        return 1.0 - t if cfg.schedule == "onecycle" else 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def split_data(data: CifarData, cfg: TrainConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / val / (test when --holdout): class-balanced and the same for every seed."""
    x, y = data.train_images, data.train_labels
    splits = {}
    if cfg.holdout:
        if cfg.holdout >= len(y):
            raise CifarError(f"--holdout {cfg.holdout} leaves no training images "
                             f"(the training split has {len(y)})")
        held = balanced_subset(y, cfg.holdout, seed=HOLDOUT_SEED)
        keep = np.setdiff1d(np.arange(len(y)), held)
        splits["val"] = (x[held], y[held])
        splits["test"] = (data.test_images, data.test_labels)
        x, y = x[keep], y[keep]
    else:
        splits["val"] = (data.test_images, data.test_labels)
    if cfg.limit_train is not None and cfg.limit_train < len(y):
        sub = balanced_subset(y, cfg.limit_train)
        x, y = x[sub], y[sub]
    splits["train"] = (x, y)
    return splits


def prepare_run_dir(out: str | None, model: str) -> Path:
    run = Path(out) if out else Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run.exists() and not run.is_dir():
        raise CifarError(f"--out {run}: exists and is not a folder; choose another --out")
    if (run / "config.json").exists():
        raise CifarError(f"--out {run}: already holds a run; choose another --out "
                         "(nothing there was changed)")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CifarError(f"--out {run}: cannot create the folder ({e.strerror})") from None
    return run


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def train(cfg: TrainConfig, data: CifarData | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train one run as `cfg` says; returns the summary also written to summary.json."""
    cfg = cfg.resolved()
    perf.tune_allocator()
    log = (lambda *a, **k: None) if quiet else functools.partial(print, flush=True)
    device, precision = cfg.device, cfg.precision
    if data is None:
        data = load_cifar10(cfg.data, cfg.download, skip_bad_images=cfg.skip_bad_images,
                            verbose=not quiet)
    run = prepare_run_dir(cfg.out, cfg.model)
    cfg.out = str(run)
    splits = split_data(data, cfg)

    torch.manual_seed(cfg.seed)
    cfg.model_kwargs.setdefault("num_classes", len(data.classes))
    model = build_model(cfg.model, **cfg.model_kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    write_json(run / "config.json", cfg.to_dict())

    x_train = torch.from_numpy(splits["train"][0]).to(device)
    y_train = torch.from_numpy(splits["train"][1]).to(device)
    padded = augment.pad_images(x_train)
    x_val, y_val = (torch.from_numpy(a) for a in splits["val"])
    mean = torch.tensor(MEAN, device=device)
    std = torch.tensor(STD, device=device)
    n, bs = len(y_train), cfg.batch_size
    steps = math.ceil(n / bs)
    sched = make_schedule(opt, cfg, steps)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")

    params = count_parameters(model)
    log(f"{cfg.model}: {params:,} parameters | {n:,} train / {len(y_val):,} "
        f"{'holdout' if cfg.holdout else 'test'} images | {device} {precision}"
        f"{' channels_last' if cfg.channels_last else ''} | batch {bs} | {cfg.epochs} epochs"
        f" | run dir {run}")

    metrics_path = run / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        plan = augment.epoch_plan(n, cfg.seed, epoch, cfg.augment)
        order, dx, dy, flip = (t.to(device) for t in (plan.order, plan.dx, plan.dy, plan.flip))
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", leave=False,
                   disable=None if not quiet else True, file=sys.stderr, dynamic_ncols=True)
        t0 = time.perf_counter()
        for s in range(steps):
            sl = slice(s * bs, (s + 1) * bs)
            idx = order[sl]
            x = augment.crop_flip(padded, idx, dx[sl], dy[sl], flip[sl])
            x = augment.normalize(x, mean, std, cfg.channels_last)
            y = y_train[idx]
            with autocast(device, precision):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += loss.detach().float() * len(idx)
            correct += (logits.detach().argmax(1) == y).sum()
            bar.update(len(idx))
            if s % 20 == 0 and bar.disable is False:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
        if device == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t0
        bar.close()
        train_seconds += epoch_seconds
        train_loss = float(loss_sum) / n
        if not math.isfinite(train_loss):
            raise CifarError(f"epoch {epoch + 1}: training loss is {train_loss}; lower --lr "
                             "or use --precision fp32")
        val = evaluate_arrays(model, x_val, y_val, device=device, precision=precision,
                              batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": int(correct) / n,
               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "seconds": epoch_seconds, "images_per_second": n / epoch_seconds,
               "lr": sched.get_last_lr()[0]}
        history.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {train_loss:.4f} acc "
            f"{row['train_accuracy']:.2%}  val loss {val['loss']:.4f} acc {val['accuracy']:.2%}  "
            f"{epoch_seconds:5.1f}s  {row['images_per_second']:,.0f} img/s")

    last = history[-1]
    meta = {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "classes": data.classes,
            "precision": precision, "channels_last": cfg.channels_last,
            "eval_batch_size": cfg.eval_batch_size, "epochs": cfg.epochs, "seed": cfg.seed,
            "val_accuracy": last["val_accuracy"], "mean": MEAN, "std": STD}
    summary: dict[str, Any] = {
        "model": cfg.model, "epochs": cfg.epochs, "seed": cfg.seed,
        "train_accuracy": last["train_accuracy"], "val_accuracy": last["val_accuracy"],
        "val_correct": round(last["val_accuracy"] * len(y_val)), "val_images": len(y_val),
        "best_val_accuracy": max(r["val_accuracy"] for r in history),
        "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - t_start,
        "images_per_second": n * cfg.epochs / train_seconds, "train_images": n,
        "parameters": params, "device": device, "precision": precision,
        "channels_last": cfg.channels_last, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    }
    if "test" in splits:
        x_test, y_test = (torch.from_numpy(a) for a in splits["test"])
        test = evaluate_arrays(model, x_test, y_test, device=device, precision=precision,
                               batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last)
        summary["test_accuracy"] = test["accuracy"]
        meta["test_accuracy"] = test["accuracy"]
        log(f"test accuracy (images never used for training or model choice): "
            f"{test['accuracy']:.2%}")
    save_weights(run / "weights.safetensors", model, meta)
    write_json(run / "summary.json", summary)
    log(f"done: val accuracy {last['val_accuracy']:.2%} | {train_seconds:.1f}s training | "
        f"{summary['images_per_second']:,.0f} img/s | weights {run / 'weights.safetensors'}")
    return summary
