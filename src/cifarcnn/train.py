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
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import augment, checkpoint, distributed, modes, native, perf
from .config import DEFAULTS, TrainConfig, recipe_changes
from .datasets import MEAN, STD, CifarData, balanced_subset, load_cifar10
from .errors import CifarError
from .inference import NonFiniteOutputs, autocast, evaluate_arrays, input_dtype
from .models import build_model, count_parameters
from .models.fast import ConvGroup
from .optim import Lookahead, MuonSGD
from .runfiles import read_json, write_text_atomic
from .weights import init_from_weights, save_weights

HOLDOUT_SEED = 1234  # fixed: the same --holdout N always holds out the same images


def make_optimizer(model: nn.Module, cfg: TrainConfig,
                   global_batch: int) -> torch.optim.Optimizer:
    """Weight decay on weights only: decaying biases (and norm scales) only costs accuracy.

    --optimizer muon: a model may say how its parameters split into groups
    (`optimizer_groups`, see models/fast.py); otherwise every trainable conv
    filter takes Muon steps at --lr and the rest Nesterov SGD at --lr.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "muon":
        if hasattr(model, "optimizer_groups"):
            groups = model.optimizer_groups(global_batch, cfg.lr)
        else:
            filters = [p for p in trainable if p.ndim == 4]
            if not filters:
                raise CifarError(f"--optimizer muon: model {cfg.model} has no conv filters "
                                 "for Muon; use sgd or adamw")
            others = [p for p in trainable if p.ndim != 4]
            groups = [{"params": filters, "muon": True},
                      {"params": [p for p in others if p.ndim > 1],
                       "weight_decay": cfg.weight_decay},
                      {"params": [p for p in others if p.ndim <= 1]}]
        return MuonSGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum)
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters instead of a few ops per tensor (CPU and CUDA)
    fused = True if next(model.parameters()).device.type in ("cpu", "cuda") else None
    if cfg.optimizer == "sgd":
        # Not under fp16's grad scaler: fused SGD on CUDA (PyTorch 2.11, seen on an H100)
        # still moves its momentum on the overflow steps the scaler skips, and the run
        # turns to NaN a step later; fused AdamW skips them properly.
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0,
                               fused=None if cfg.precision == "fp16" else fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), fused=fused)


def epoch_images(n: int, cfg: TrainConfig) -> list[int]:
    """Images each epoch trains on: all n, then a fraction once loss-based selection starts.

    Selection (`--select-fraction F`) spends the step budget where the loss
    is: after the first epoch(s), each epoch trains only on the fraction F of
    the images with the highest loss when last seen, an idea from selective
    backprop (Jiang et al., 2019), but with the losses the training forward
    pass already computed, so choosing costs no extra pass.
    """
    chosen = max(1, round(n * cfg.select_fraction))
    return [n if e < cfg.select_from_epoch else chosen for e in range(cfg.epochs)]


def epoch_sizes(cfg: TrainConfig, epoch: int) -> tuple[int, int]:
    """(crop, input): the crop each image gives in `epoch`, and the size the net sees.

    Progressive resizing in two stages: the first `downscale_epochs` shrink
    the whole (translated, flipped) image to `downscale` pixels, a quarter
    of the convolution work at 16 against 32 while every object stays whole;
    the next `low_res_epochs` train on crops of `low_res` pixels, which keep
    the objects at the scale the test images show them; the rest at 32.
    """
    if epoch < cfg.downscale_epochs:
        return 32, cfg.downscale
    if cfg.low_res and epoch < cfg.downscale_epochs + cfg.low_res_epochs:
        return cfg.low_res, cfg.low_res
    return 32, 32


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig,
                  epoch_steps: list[int]) -> torch.optim.lr_scheduler.LambdaLR:
    """LR multiplier per step: linear warm-up from 0.1x, then linear (onecycle) or cosine to 0.

    `epoch_steps` is the number of steps of each epoch (they differ when
    selection shortens later epochs); warm-up epochs count in first-epoch steps.
    A parameter group with `stop_epochs` decays linearly to 0 by the end of
    that epoch instead (fast's whitening bias, which only needs adjusting early on).
    """
    total = sum(epoch_steps)
    warm = min(int(cfg.warmup_epochs * epoch_steps[0]), total - 1)

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warm:
            return 0.1 + 0.9 * step / warm
        t = (step - warm) / max(1, total - warm)
        return 1.0 - t if cfg.schedule == "onecycle" else 0.5 * (1.0 + math.cos(math.pi * t))

    def until(stop_steps: int):
        return lambda step: max(0.0, 1.0 - step / stop_steps)

    def steps_until(epochs: float) -> int:
        whole = int(epochs)
        part = epochs - whole
        return sum(epoch_steps[:whole]) + (int(part * epoch_steps[whole]) if part else 0)

    lambdas = [until(steps_until(g["stop_epochs"])) if g.get("stop_epochs")
               else factor for g in opt.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def freeze_finished_groups(opt: torch.optim.Optimizer, epoch: int) -> None:
    """Parameters whose group stopped (`stop_epochs`) no longer need gradients at all.

    Besides the optimizer work, this spares the backward pass of whatever
    feeds them: for fast's whitening bias, the first conv's input gradient.
    """
    for g in opt.param_groups:
        if _stopped(g, epoch):
            for p in g["params"]:
                p.requires_grad_(False)
                p.grad = None


def _stopped(group: dict[str, Any], epoch: int) -> bool:
    """Whether a parameter group's own schedule (`stop_epochs`) has ended by `epoch`."""
    return bool(group.get("stop_epochs")) and epoch >= group["stop_epochs"]


def init_from_data(model: nn.Module, x_train: torch.Tensor, cfg: TrainConfig,
                   mean: torch.Tensor, std: torch.Tensor) -> None:
    """A model's data-dependent initialisation (fast's whitening layer), for a fresh
    start: a fixed sample of the training images, the same on every rank. Weights
    given by --init-from keep theirs."""
    if not hasattr(model, "init_from_data") or cfg.init_from:
        return
    sample = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(
        cfg.seed))[:5000].to(x_train.device)]
    if cfg.noise:  # fitted to what it will see: noise then counts as variance to damp
        sample = augment.add_noise(sample, cfg.noise, augment.noise_seed(cfg.seed, -1, 0, 0))
    model.init_from_data(augment.normalize(sample, mean, std, channels_last=False))


def split_data(data: CifarData, cfg: TrainConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / val / (test when --holdout): class-balanced and the same for every seed."""
    x, y = data.train_images, data.train_labels
    if not len(y):
        raise CifarError(f"{data.source}: no training images; an image folder needs "
                         "train/<class>/ images to train on (test/ alone serves evaluate)")
    present = np.unique(y)
    if len(present) < 2:  # a one-class "classifier" reaches 100% having learnt nothing
        raise CifarError(f"{data.source}: every training image is of one class, "
                         f"{data.classes[int(present[0])]!r}; a classifier needs images of at "
                         "least two classes (add train/<class>/ folders)")
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


def check_run_dir(run: Path) -> None:
    """Refuse an --out that cannot take a new run, before anything is made or loaded.

    Also called before the data loads, so that a taken or unwritable --out fails at once,
    not after the data set's decode (only creating the folder can prove it writable).
    """
    if run.exists() and not run.is_dir():
        raise CifarError(f"--out {run}: exists and is not a folder; choose another --out")
    if (run / "config.json").exists():
        raise CifarError(f"--out {run}: already holds a run; choose another --out "
                         "(nothing there was changed)")
    parent = run.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CifarError(f"--out {run}: cannot create the folder ({parent} is not a writable "
                         "folder); choose another --out")


def prepare_run_dir(out: str | None, model: str) -> Path:
    run = Path(out) if out else Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_run_dir(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CifarError(f"--out {run}: cannot create the folder ({e.strerror})") from None
    return run


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic("--out", path, json.dumps(obj, indent=2) + "\n")


def train(cfg: TrainConfig, data: CifarData | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train one new run as `cfg` says; returns the summary also written to summary.json.

    Under torchrun every rank calls this; rank 0 alone creates the run directory.
    """
    cfg = cfg.resolved()
    world = distributed.setup(cfg.device, cfg.dist_timeout)
    quiet = quiet or not world.main
    if cfg.out and not world.active:  # under torchrun an early raise would strand the others
        check_run_dir(Path(cfg.out))
    data = _load_data(cfg, data, quiet, world)
    run: Path | str | None = None
    created = False
    if world.main:
        try:
            created = cfg.out is None or not Path(cfg.out).exists()
            run = prepare_run_dir(cfg.out, cfg.model)
            cfg.out = str(run)
            write_json(run / "config.json", cfg.to_dict())
        except CifarError as e:
            run = f"error: {e}"
    run = distributed.broadcast_object(str(run), world)
    if run.startswith("error: "):
        raise CifarError(run[len("error: "):])
    cfg.out = run
    try:
        return _run(cfg, Path(run), data, None, quiet, world)
    except CifarError:
        if world.main:
            _forget_unstarted_run(Path(run), created)
        raise


def _forget_unstarted_run(run: Path, created: bool) -> None:
    """After bad input stopped a run before its first epoch ended (one class of images, a
    bad model argument), remove what it wrote: only config.json, which would make the
    same command, once the input is fixed, refuse the folder as holding a run."""
    if sorted(p.name for p in run.iterdir()) == ["config.json"]:
        (run / "config.json").unlink()
        if created:
            run.rmdir()


def _load_data(cfg: TrainConfig, data: CifarData | None, quiet: bool,
               world: distributed.World) -> CifarData:
    """Rank 0 decodes (and caches) first; the other ranks then read its cache."""
    if data is not None:
        return data
    if not world.main:
        distributed.barrier(world)
    data = load_cifar10(cfg.data, cfg.download, skip_bad_images=cfg.skip_bad_images,
                        verbose=not quiet)
    if world.main:
        distributed.barrier(world)
    return data


def resume(run_dir: str | os.PathLike, data_path: str | None = None,
           data: CifarData | None = None, quiet: bool = False) -> dict[str, Any]:
    """Continue the run in `run_dir` from its last checkpoint, with its saved config.

    `data_path` replaces the recorded data location (the data may have moved);
    everything else comes from the run, so the result equals an uninterrupted run.
    """
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise CifarError(f"--resume {run}: not a run directory (no config.json); give the "
                         "folder a `cifarcnn train` run wrote")
    if (run / "summary.json").is_file():
        summary = read_json(run / "summary.json", numbers=("val_accuracy",))
        acc = summary.get("val_accuracy")
        if not quiet:
            said = f" (val accuracy {acc:.2%})" if acc is not None else ""  # checked: a number
            print(f"{run}: already finished{said}; nothing to do", flush=True)
        return summary
    ckpt = checkpoint.load(run / checkpoint.LAST) if (run / checkpoint.LAST).is_file() else None
    if ckpt:
        cfg = TrainConfig.from_saved(ckpt.get("config"), str(run / checkpoint.LAST))
        saved = ckpt["config"]
    else:
        saved = read_json(run / "config.json")
        cfg = TrainConfig.from_saved(saved, str(run / "config.json"))
    for k, v in DEFAULTS.items():
        if k not in saved:  # recorded before the setting existed: the run trained without it
            setattr(cfg, k, v)
    if data_path:
        cfg.data = data_path
    cfg.out = str(run)
    cfg = cfg.resolved()
    world = distributed.setup(cfg.device, cfg.dist_timeout)
    quiet = quiet or not world.main
    if ckpt is not None and ckpt.get("world_size", 1) != world.size:
        raise CifarError(f"--resume {run}: the run was checkpointed with "
                         f"{ckpt.get('world_size', 1)} process(es), this job has {world.size}; "
                         "resume with the same number of processes")
    data = _load_data(cfg, data, quiet, world)
    return _run(cfg, run, data, ckpt, quiet, world)


def _run(cfg: TrainConfig, run: Path, data: CifarData, ckpt: dict[str, Any] | None,
         quiet: bool, world: distributed.World) -> dict[str, Any]:
    """The loop itself, from the start (`ckpt` None) or from a checkpoint."""
    perf.tune_allocator()
    log = (lambda *a, **k: None) if quiet else functools.partial(print, flush=True)
    device, precision = cfg.device, cfg.precision
    if cfg.deterministic:
        if device == "cuda":  # cuBLAS repeats its sums exactly only with a fixed workspace
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    splits = split_data(data, cfg)

    torch.manual_seed(cfg.seed)
    cfg.model_kwargs.setdefault("num_classes", len(data.classes))
    model = build_model(cfg.model, **cfg.model_kwargs)
    if cfg.init_from and ckpt is None:
        copied, fresh = init_from_weights(model, cfg.init_from, data.classes)
        log(f"starting from {cfg.init_from}" + (
            f" (a new head for {len(data.classes)} classes: {fresh} of its {copied + fresh} "
            "tensors start afresh)" if fresh else ""))
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model  # what the step calls: the model, its mode wrapper, or DDP's
    if world.size > 1 and cfg.mode in ("trace", "script"):
        raise CifarError(f"--mode {cfg.mode} runs in one process; under torchrun use "
                         "--mode eager or compile")
    if world.size > 1:
        # Same initial weights everywhere (DDP also broadcasts rank 0's), but each rank
        # its own dropout stream; rank 0 keeps the single-process stream.
        if world.rank:
            torch.manual_seed(cfg.seed + 1_000_003 * world.rank)
        if cfg.sync_bn:
            if device != "cuda":
                raise CifarError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm runs on GPUs "
                                 "only); on CPU leave it out: BatchNorm then uses each "
                                 "process's own batch statistics")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[world.local_rank] if device == "cuda" else None)
    opt = make_optimizer(model, cfg, cfg.batch_size * world.size)

    x_train = torch.from_numpy(splits["train"][0]).to(device)
    y_train = torch.from_numpy(splits["train"][1]).to(device)
    padded = augment.pad_images(x_train, cfg.translate, cfg.pad_mode)
    x_val, y_val = (torch.from_numpy(a) for a in splits["val"])
    mean = torch.tensor(MEAN, device=device)
    std = torch.tensor(STD, device=device)
    if ckpt is None:
        init_from_data(model, x_train, cfg, mean, std)
    n, bs = len(y_train), cfg.batch_size
    counts = epoch_images(n, cfg)
    epoch_steps = [distributed.global_steps(count, bs, world) for count in counts]
    first_steps = [sum(epoch_steps[:e]) for e in range(cfg.epochs)]  # global step numbers
    global_bs = bs * world.size
    sched = make_schedule(opt, cfg, epoch_steps)
    # Loss-based selection remembers each image's loss when last trained on; an image not
    # seen yet counts as hardest. Only the loss values move between ranks, once an epoch.
    selecting = cfg.select_fraction < 1
    remembered = torch.full((n,), math.inf, device=device) if selecting else None
    # --flip alternate-seen: how many epochs each image was trained in before this one
    times_seen = torch.zeros(n, dtype=torch.long) if cfg.flip == "alternate-seen" else None
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    # Traced and scripted graphs get their bf16 casts from the JIT's autocast pass, which
    # expects fp32 inputs; eager and compiled models take bf16 images directly.
    in_dtype = input_dtype(precision) if cfg.mode in ("eager", "compile") else torch.float32
    setup_seconds = 0.0
    if device == "cpu" and any(isinstance(m, ConvGroup) for m in model.modules()):
        # the fused kernels (native.py): compiled on first use, cached across runs
        t0 = time.perf_counter()
        built = native.extension() is not None
        setup_seconds = time.perf_counter() - t0
        if setup_seconds > 1:
            log(f"fused CPU kernels {'built' if built else 'not built'} in {setup_seconds:.1f}s "
                "(one-time set-up, not counted as training time)")
    if cfg.mode != "eager":
        def example(size: int) -> torch.Tensor:  # the graphs depend on the input size only
            return augment.normalize(x_train[:bs, :size, :size].contiguous(), mean, std,
                                     cfg.channels_last, in_dtype)

        t0 = time.perf_counter()
        net = modes.wrap(net, cfg.mode, example(32))
        # Every graph the epochs will run, compiled now rather than inside the timed
        # training: each crop size, short last batch and set of frozen groups (a frozen
        # whitening bias drops a gradient, so the backward graph changes).
        flags = [p.requires_grad for p in model.parameters()]
        for epoch, size, length in sorted(_graph_variants(cfg, opt, counts, epoch_steps,
                                                          global_bs, world)):
            if world.size == 1:
                freeze_finished_groups(opt, epoch)
            mine = distributed.shard(0, length, world)  # this rank's part of such a batch
            _warm_up(net, model, example(size)[:mine.stop - mine.start], device, precision)
            for p, flag in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(flag)
        took = time.perf_counter() - t0
        setup_seconds += took
        log(f"--mode {cfg.mode}: {took:.1f}s one-time set-up "
            "(compile/trace, not counted as training time)")

    # Evaluation runs the mode's graph in one process; under DDP the plain model, because
    # ranks evaluate different numbers of batches and DDP's forward may sync buffers.
    eval_net = net if world.size == 1 else model

    history: list[dict[str, Any]] = []
    train_seconds, start_epoch, start_step, partial = 0.0, 0, 0, None
    lookahead = (Lookahead(model, cfg.lookahead, cfg.lookahead_decay, sum(epoch_steps))
                 if cfg.lookahead else None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        history, train_seconds = ckpt["history"], ckpt["train_seconds"]
        if selecting:
            remembered = ckpt["remembered_losses"].to(device)
        if times_seen is not None:
            times_seen = ckpt["times_seen"]
        start_epoch, start_step, partial = ckpt["epoch"], ckpt["step"], ckpt["partial"]
        if lookahead is not None:
            lookahead.load_state_dict(ckpt["lookahead"])
        checkpoint.set_rng_state(ckpt["rng_ranks"][world.rank])
        if partial is not None:
            partial = partial["ranks"][world.rank]
    metrics_path = run / "metrics.jsonl"  # rewritten: rows after the checkpoint are redone
    if world.main:
        checkpoint.write_atomic(metrics_path,
                                "".join(json.dumps(r) + "\n" for r in history).encode())

    board = _tensorboard(run, start_epoch) if cfg.tensorboard and world.main else None

    params = count_parameters(model)
    select_note = (f" | from epoch {cfg.select_from_epoch + 1}: the hardest "
                   f"{cfg.select_fraction:.0%}" if selecting else "")
    # the fast net's int8 convs (a CPU default where they pay: models/fast.py) are named
    int8_note = (" + int8 convs" if device == "cpu" and getattr(model, "int8_positions", 0)
                 else "")
    log(f"{cfg.model}: {params:,} parameters | {n:,} train / {len(y_val):,} "
        f"{'holdout' if cfg.holdout else 'test'} images | {device} {precision}{int8_note}"
        f"{' channels_last' if cfg.channels_last else ''} | batch {bs}"
        f"{f' x {world.size} processes' if world.size > 1 else ''} | {cfg.epochs} epochs"
        f"{select_note} | run dir {run}")
    if ckpt is not None:
        log(f"resuming from {run / checkpoint.LAST}: epoch {start_epoch + 1}, step {start_step}")

    def save_checkpoint(epoch: int, step: int, part: dict[str, Any] | None) -> None:
        """Every rank calls this (it gathers their RNG states); rank 0 alone writes."""
        rngs = distributed.gather_objects(checkpoint.rng_state(), world)
        parts = distributed.gather_objects(part, world) if part is not None else None
        if not world.main:
            return
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "rng_ranks": rngs, "epoch": epoch, "step": step,
                 "partial": None if parts is None else {"ranks": parts},
                 "history": history, "train_seconds": train_seconds, "config": cfg.to_dict(),
                 "remembered_losses": remembered, "times_seen": times_seen,
                 "lookahead": None if lookahead is None else lookahead.state_dict(),
                 "world_size": world.size}
        checkpoint.save(run / checkpoint.LAST, state)
        if step == 0 and history and history[-1]["val_accuracy"] >= max(
                r["val_accuracy"] for r in history):
            checkpoint.save(run / checkpoint.BEST, state)

    every = cfg.checkpoint_every or 0
    guard = FiniteGuard(device, epoch_steps, first_step=first_steps[start_epoch] + start_step
                        if start_epoch < cfg.epochs else sum(epoch_steps))
    t_start = time.perf_counter()
    with checkpoint.StopSignals() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            if world.size == 1:  # DDP expects the same parameters to get gradients each step
                freeze_finished_groups(opt, epoch)
            # Progressive resizing: early epochs see smaller images at a fraction of the cost
            # (conv time scales with pixels); the net ends in a global pool, so any size fits.
            crop, size = epoch_sizes(cfg, epoch)
            plan = augment.epoch_plan(n, cfg.seed, epoch, cfg.augment, cfg.translate, cfg.flip,
                                      shrink=32 - crop)
            count, steps = counts[epoch], epoch_steps[epoch]
            if selecting:
                fresh = torch.zeros((2, n), device=device)  # loss, was-trained, this epoch
            if selecting and epoch >= cfg.select_from_epoch:
                # the choice depends on the losses remembered at the epoch's start only, so
                # a run resumed mid-epoch makes it again identically
                plan = plan.subset(augment.hardest(remembered, count).cpu())
            if times_seen is not None:  # counts from the epoch's start, as the choice above
                plan = augment.flips_by_times_seen(plan, cfg.seed, times_seen)
            order, dx, dy, flip = (t.to(device) for t in (plan.order, plan.dx, plan.dy, plan.flip))
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = torch.zeros((), device=device, dtype=torch.long)
            epoch_seconds, first = 0.0, 0
            if partial is not None and epoch == start_epoch:
                first, epoch_seconds = start_step, partial["seconds"]
                loss_sum += partial["loss_sum"]
                correct += partial["correct"]
                seen += partial["seen"]
                if selecting:
                    fresh.copy_(partial["fresh"])
            bar = tqdm(total=count, initial=min(count, first * global_bs),
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", leave=False,
                       disable=True if quiet else None, file=sys.stderr, dynamic_ncols=True)
            t0 = time.perf_counter()
            for s in range(first, steps):
                sl = distributed.shard(s * global_bs, min(count, (s + 1) * global_bs), world)
                idx = order[sl]
                x = augment.crop_flip(padded, idx, dx[sl], dy[sl], flip[sl], crop)
                if cfg.noise:
                    x = augment.add_noise(x, cfg.noise,
                                          augment.noise_seed(cfg.seed, epoch, s, world.rank))
                x = augment.normalize(x, mean, std, cfg.channels_last, in_dtype)
                if size != crop:
                    x = augment.shrink(x, size)
                y = y_train[idx]
                with autocast(device, precision):
                    logits = net(x)
                    losses = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing,
                                             reduction="none")
                    loss = losses.mean()
                if selecting:
                    fresh[0, idx] = losses.detach().float()
                    fresh[1, idx] = 1.0
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                done = first_steps[epoch] + s + 1
                if lookahead is not None:
                    lookahead.after_step(done)
                loss = loss.detach()
                guard.record(loss)
                loss_sum += loss.float() * len(idx)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(idx)
                bar.update(min(count, (s + 1) * global_bs) - s * global_bs)
                if s % 20 == 0 and bar.disable is False:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
                signum = _agreed_signal(stop.signum, world, device)
                mid_save = (every and done % every == 0) or signum is not None
                if guard.full() or (mid_save and s + 1 < steps):
                    guard.check(run)
                if mid_save and s + 1 < steps:
                    if device == "cuda":
                        torch.cuda.synchronize()
                    epoch_seconds += time.perf_counter() - t0
                    train_seconds += time.perf_counter() - t0
                    part = {"loss_sum": loss_sum, "correct": correct, "seen": seen,
                            "seconds": epoch_seconds}
                    if selecting:
                        part["fresh"] = fresh
                    save_checkpoint(epoch, s + 1, part)
                    if signum is not None:
                        bar.close()
                        raise _interrupted(signum, run, epoch, s + 1)
                    t0 = time.perf_counter()
            if lookahead is not None and epoch + 1 == cfg.epochs:
                lookahead.finish()  # the run ends on the slow weights
            if device == "cuda":
                torch.cuda.synchronize()
            epoch_seconds += time.perf_counter() - t0
            train_seconds += time.perf_counter() - t0
            bar.close()
            guard.check(run)
            if times_seen is not None:
                times_seen[plan.order] += 1
            if selecting:
                # ranks trained on disjoint images: their sums are everyone's losses
                fresh = distributed.all_reduce_sum(fresh, world)
                remembered = torch.where(fresh[1] > 0, fresh[0], remembered)
            totals = distributed.all_reduce_sum(
                torch.stack([loss_sum.double(), correct.double(), seen.double()]), world)
            train_loss, n_seen = float(totals[0] / totals[2]), int(totals[2])
            # A many-view TTA costs more than a short recipe's epoch: such recipes check
            # intermediate epochs on the plain view only, and apply the TTA at the end.
            tta = cfg.tta if cfg.tta_every_epoch or epoch + 1 == cfg.epochs else "none"
            try:
                val = evaluate_arrays(eval_net, x_val, y_val, device=device,
                                      precision=precision, batch_size=cfg.eval_batch_size,
                                      channels_last=cfg.channels_last, tta=tta, world=world)
            except NonFiniteOutputs as e:  # finite losses can still grow past every range
                kept = (f"the last good checkpoint {run / checkpoint.LAST} is kept"
                        if (run / checkpoint.LAST).exists() else "no checkpoint was written")
                wider = ", or train in --precision fp32" if precision != "fp32" else ""
                raise CifarError(f"after epoch {epoch + 1}, {e}; stopped, {kept}. Lower "
                                 f"--lr{wider}") from None
            row = {"epoch": epoch + 1, "train_loss": train_loss,
                   "train_accuracy": float(totals[1] / totals[2]), "val_loss": val["loss"],
                   "val_accuracy": val["accuracy"], "val_accuracy_no_tta": val["accuracy_no_tta"],
                   "train_images": n_seen, "seconds": epoch_seconds,
                   "images_per_second": n_seen / epoch_seconds,
                   "lr": sched.get_last_lr()[0]}
            history.append(row)
            if world.main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if board is not None:
                for key, value in row.items():
                    if key != "epoch":
                        board.add_scalar(key, value, epoch + 1)
                board.flush()
            tta_note = f" ({val['accuracy_no_tta']:.2%} no TTA)" if tta != "none" else ""
            log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {train_loss:.4f} acc "
                f"{row['train_accuracy']:.2%}  val loss {val['loss']:.4f} acc "
                f"{val['accuracy']:.2%}{tta_note}  {epoch_seconds:5.1f}s  "
                f"{row['images_per_second']:,.0f} img/s")
            save_checkpoint(epoch + 1, 0, None)
            signum = _agreed_signal(stop.signum, world, device)
            if signum is not None and epoch + 1 < cfg.epochs:
                raise _interrupted(signum, run, epoch + 1, 0)

    if board is not None:
        board.close()
    last = history[-1]
    meta = {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "classes": data.classes,
            "precision": precision, "channels_last": cfg.channels_last,
            **({"int8_positions": model.int8_positions} if int8_note else {}),
            "eval_batch_size": cfg.eval_batch_size, "epochs": cfg.epochs, "seed": cfg.seed,
            "tta": cfg.tta, "val_accuracy": last["val_accuracy"],
            "val_accuracy_no_tta": last["val_accuracy_no_tta"], "mean": MEAN, "std": STD,
            "recipe_changes": recipe_changes(cfg),
            **({"init_from": cfg.init_from} if cfg.init_from else {}),
            **({"holdout": cfg.holdout} if cfg.holdout else {})}  # calibrate's images
    summary: dict[str, Any] = {
        "model": cfg.model, "epochs": cfg.epochs, "seed": cfg.seed,
        "train_accuracy": last["train_accuracy"], "val_accuracy": last["val_accuracy"],
        "val_accuracy_no_tta": last["val_accuracy_no_tta"], "tta": cfg.tta,
        "val_correct": round(last["val_accuracy"] * len(y_val)), "val_images": len(y_val),
        "best_val_accuracy": max(r["val_accuracy"] for r in history),
        "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - t_start,
        "images_per_second": sum(counts) / train_seconds, "train_images": n,
        "images_trained_on": sum(counts),
        "processes": world.size, "global_batch_size": global_bs, "mode": cfg.mode,
        "setup_seconds": setup_seconds,
        "parameters": params, "device": device, "precision": precision,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
        "channels_last": cfg.channels_last, "torch": torch.__version__,
        "cpu": perf.cpu_name(), "threads": torch.get_num_threads(),
        "resumed": ckpt is not None, "init_from": cfg.init_from,
    }
    if "test" in splits:
        x_test, y_test = (torch.from_numpy(a) for a in splits["test"])
        test = evaluate_arrays(model, x_test, y_test, device=device, precision=precision,
                               batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last,
                               tta=cfg.tta, world=world)
        summary["test_accuracy"] = test["accuracy"]
        meta["test_accuracy"] = test["accuracy"]
        log(f"test accuracy (images never used for training or model choice): "
            f"{test['accuracy']:.2%}")
    if world.main:
        save_weights(run / "weights.safetensors", model, meta)
        write_json(run / "summary.json", summary)
    distributed.barrier(world)
    log(f"done: val accuracy {last['val_accuracy']:.2%} | {train_seconds:.1f}s training | "
        f"{summary['images_per_second']:,.0f} img/s | weights {run / 'weights.safetensors'}")
    return summary


def _tensorboard(run: Path, start_epoch: int):
    """A TensorBoard writer in the run directory; on resume, later events are replaced."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CifarError("--tensorboard needs the tensorboard package: "
                         "pip install 'cifarcnn[tensorboard]'") from None
    return SummaryWriter(str(run / "tensorboard"), purge_step=start_epoch + 1)


def _graph_variants(cfg: TrainConfig, opt: torch.optim.Optimizer, counts: list[int],
                    epoch_steps: list[int], global_bs: int,
                    world: distributed.World) -> set[tuple[int, int, int]]:
    """(epoch, input size, global batch length) for each distinct graph the training runs.

    The epoch stands for the groups frozen by then (`freeze_finished_groups`,
    single process only); epochs that share frozen groups, size and batch
    lengths keep the first of them.
    """
    first: dict[tuple[frozenset[int], int, int], int] = {}  # graph -> first epoch with it
    for epoch, (count, k) in enumerate(zip(counts, epoch_steps, strict=True)):
        _, size = epoch_sizes(cfg, epoch)  # a shrunk epoch resizes before the net
        stopped = frozenset(i for i, g in enumerate(opt.param_groups)
                            if world.size == 1 and _stopped(g, epoch))
        # global batch lengths, so that every rank warms up the same number of times (its
        # share of two different lengths may be equal)
        for length in {min(count, global_bs), min(count, k * global_bs) - (k - 1) * global_bs}:
            first.setdefault((stopped, size, length), epoch)
    return {(epoch, size, length) for (_, size, length), epoch in first.items()}


def _warm_up(net: nn.Module, model: nn.Module, example: torch.Tensor, device: str,
             precision: str) -> None:
    """Run one train-mode step and one eval-mode forward so compilation happens now.

    It changes nothing the run will see: gradients are dropped, BatchNorm
    buffers and the RNG (dropout) are restored, so a run in any mode follows
    the same random stream as eager.
    """
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device == "cuda" else None
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    was_training = net.training
    net.train()
    with autocast(device, precision):
        net(example).float().sum().backward()
    net.eval()
    # as evaluation runs it (inference.evaluate_arrays): in inference mode, whose tensors
    # a compiled graph tells apart from ordinary ones
    with torch.inference_mode(), autocast(device, precision):
        net(example.clone())
    net.train(was_training)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)


def _agreed_signal(signum: int | None, world: distributed.World, device: str) -> int | None:
    """The stop signal as all ranks see it, so that all stop at the same step.

    torchrun forwards SIGINT/SIGTERM to every rank, but they may notice it a
    step apart; one tiny all-reduce per step (max of the signal numbers) lines
    them up, so they take part in the same checkpoint and stop together.
    """
    if world.size == 1:
        return signum
    t = torch.tensor([signum or 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t) or None


def _interrupted(signum: int, run: Path, epoch: int, step: int) -> checkpoint.Interrupted:
    name = signal.Signals(signum).name
    return checkpoint.Interrupted(
        signum, f"{name}: stopped at epoch {epoch + 1}, step {step}; checkpoint written to "
        f"{run / checkpoint.LAST}. Continue with: cifarcnn train --resume {run}")


class FiniteGuard:
    """Spots a NaN/inf loss without a host sync per step.

    Losses go into a small on-device window; every `size` steps (and before
    any checkpoint) the window is read once. A bad loss stops the run naming
    its exact step, before a poisoned state can overwrite the last good
    checkpoint.
    """

    def __init__(self, device: str, epoch_steps: list[int], first_step: int = 0,
                 size: int = 50) -> None:
        self.window = torch.zeros(size, device=device)
        self.count = 0
        self.epoch_steps = epoch_steps
        self.first_step = first_step  # global step of window[0]

    def record(self, loss: torch.Tensor) -> None:
        self.window[self.count] = loss.float()
        self.count += 1

    def full(self) -> bool:
        return self.count == len(self.window)

    def check(self, run: Path) -> None:
        bad = (~torch.isfinite(self.window[:self.count])).nonzero()
        if len(bad):
            step = self.first_step + int(bad[0])
            epoch, batch = 0, step
            while epoch + 1 < len(self.epoch_steps) and batch >= self.epoch_steps[epoch]:
                batch -= self.epoch_steps[epoch]
                epoch += 1
            value = float(self.window[int(bad[0])])
            kept = (f"the last good checkpoint {run / checkpoint.LAST} is kept"
                    if (run / checkpoint.LAST).exists() else "no checkpoint had been written")
            raise CifarError(f"training loss is {value} at step {step + 1} (epoch "
                             f"{epoch + 1}, batch {batch + 1}); stopped, {kept}. "
                             "Lower --lr, or train in --precision fp32")
        self.first_step += self.count
        self.count = 0
