"""Whole trainings priced from interleaved step times: recipes against each other and airbench's.

    python benchmarks/recipe_cost.py [--recipe NAME=FLAGS ...] [--airbench] [--rounds 8]
        [--device cpu]

On a machine whose speed swings (the Intel Xeon of the README's "Another CPU"
ran the same step 2-3x slower from one minute to the next), whole runs timed
at different hours cannot be compared. This builds each recipe's training
configuration from `cifarcnn train` flags (FLAGS, over the fast model's
defaults), lists the kinds of step its epochs take (input size, batch, and
how many parameter groups have stopped training by then, e.g. the fast
model's whitening bias after epoch 3, which spares the first conv's input
gradient) with how many steps of each, then times one step of every kind,
round robin, so that each round prices every recipe in the same minute
(recipes that take the same step share its timings).
Printed per recipe: its steps, the estimated training seconds (the median over
the rounds, and their range) and the median (and range) over the rounds of its
ratio to the first recipe. Steps only: the per-epoch augmentation, selection
bookkeeping and validation are not in it (a few percent of a run), and a
short last batch is priced as a full one. FLAGS may also hold
`--pytorch-layers`: the recipe runs on PyTorch's own layers only (no fused
kernels, oneDNN's convolutions and filter gradients), as code outside this project
would.

--airbench adds airbench94_muon's net and schedule as this code builds them
(widths 64/256/256, batch 2,000, Muon rate 0.24, 8 epochs on whole 32x32
images, all images every epoch) on PyTorch's own layers: the recipe issue 3
measures against, priced in the same minutes as ours. It comes first, so the
ratios are to its time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cifarcnn import native, perf
from cifarcnn.cli import _config_from_flags, _train_flags
from cifarcnn.config import TrainConfig, read_config_file
from cifarcnn.errors import CifarError
from cifarcnn.inference import autocast, input_dtype
from cifarcnn.models import build_model
from cifarcnn.train import _stopped, epoch_images, epoch_sizes, make_optimizer

TRAIN_IMAGES = 50_000
PLAIN = "--pytorch-layers"
AIRBENCH = ("airbench94_muon=--model-arg widths=[64,256,256] --batch-size 2000 --lr 0.24 "
            f"--epochs 8 --downscale 0 --low-res 0 --select-fraction 1 {PLAIN}")


@dataclasses.dataclass
class Recipe:
    name: str
    cfg: TrainConfig
    plain: bool  # PyTorch's own layers only
    counts: Counter  # (input size, batch, groups stopped) -> steps


def parse_recipe(text: str, device: str) -> Recipe:
    """'NAME=FLAGS' -> its resolved configuration and the steps it takes."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise CifarError(f"--recipe {text!r}: give NAME=FLAGS, e.g. "
                         "'13ep=--epochs 13 --low-res-epochs 3 --select-from-epoch 4'")
    try:
        tokens = shlex.split(flags)
    except ValueError as e:
        raise CifarError(f"--recipe {name}: its flags do not parse ({e})") from None
    plain = PLAIN in tokens

    def parse(config: dict | None) -> tuple[argparse.Namespace, list[str]]:
        parser = argparse.ArgumentParser(prog=f"--recipe {name}", exit_on_error=False)
        _train_flags(parser, config)
        # the benchmark's own defaults, where a --config file does not set them
        parser.set_defaults(**{k: v for k, v in (("model", "fast"), ("device", device))
                               if k not in (config or {})})
        try:
            return parser.parse_known_args([t for t in tokens if t != PLAIN])
        except argparse.ArgumentError as e:
            raise CifarError(f"--recipe {name}: {e}") from None

    args, unknown = parse(None)
    if args.config is not None:
        args, unknown = parse(read_config_file(args.config))
    if unknown:
        raise CifarError(f"--recipe {name}: unknown flags {' '.join(unknown)} (the flags of "
                         f"`cifarcnn train`, plus {PLAIN})")
    cfg = _config_from_flags(args)
    if plain and cfg.model == "fast":
        cfg.model_kwargs = {**cfg.model_kwargs, "gemm_grad_positions": 0, "dense_positions": 0}
    try:
        cfg = cfg.resolved()
    except CifarError as e:
        raise CifarError(f"--recipe {name}: {e}") from None
    return Recipe(name.strip(), cfg, plain, plan(cfg))


def plan(cfg: TrainConfig, train_images: int = TRAIN_IMAGES) -> Counter:
    """How many steps of each kind the recipe's epochs take."""
    opt = make_optimizer(build_model(cfg.model, **cfg.model_kwargs), cfg, cfg.batch_size)
    counts: Counter = Counter()
    for epoch, images in enumerate(epoch_images(train_images, cfg)):
        stopped = sum(_stopped(g, epoch) for g in opt.param_groups)
        counts[epoch_sizes(cfg, epoch)[1], cfg.batch_size, stopped] += math.ceil(
            images / cfg.batch_size)
    return counts


def frozen_model(cfg: TrainConfig, stopped: int
                 ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """`cfg`'s model and optimizer as training has them once `stopped` groups have stopped:
    those groups' parameters frozen, as `train.freeze_finished_groups` leaves them."""
    device = cfg.device
    model = build_model(cfg.model, **cfg.model_kwargs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, cfg.batch_size)
    epoch = 0  # the first epoch by which `stopped` groups have stopped
    while sum(_stopped(g, epoch) for g in opt.param_groups) < stopped:
        epoch += 1
    for g in opt.param_groups:
        if _stopped(g, epoch):
            for p in g["params"]:
                p.requires_grad_(False)
    return model, opt


def step_key(r: Recipe, kind: tuple) -> tuple:
    """What one step's time depends on: recipes whose steps agree on it share its timings."""
    c = r.cfg
    return (c.model, repr(sorted(c.model_kwargs.items())), kind, r.plain, c.precision,
            c.channels_last, c.device, c.optimizer, c.label_smoothing)


def timed_steps(recipes: list[Recipe], rounds: int, log: Callable[[str], None] = print
                ) -> dict[tuple[int, tuple], list[float]]:
    """Seconds per step of each (recipe, kind), one of each distinct step per round, after a
    warm-up; recipes that take the same step (the same net, input and frozen groups) share
    its timings, so adding a recipe adds only its new kinds of step to each round."""
    steps: dict[tuple, tuple] = {}
    for r in recipes:
        for kind in r.counts:
            key = step_key(r, kind)
            if key in steps:
                continue
            size, batch, stopped = kind
            model, opt = frozen_model(r.cfg, stopped)
            x = torch.randn(batch, 3, size, size, device=r.cfg.device).to(
                input_dtype(r.cfg.precision))
            if r.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,), device=r.cfg.device)
            steps[key] = (r, model, opt, x, y)
    shared: dict[tuple, list[float]] = {k: [] for k in steps}
    for n in range(rounds + 1):  # round 0 warms up
        for key, (r, model, opt, x, y) in steps.items():
            with native.turned_off() if r.plain else contextlib.nullcontext():
                t0 = time.perf_counter()
                with autocast(r.cfg.device, r.cfg.precision):
                    loss = F.cross_entropy(model(x), y, label_smoothing=r.cfg.label_smoothing)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r.cfg.device == "cuda":
                    torch.cuda.synchronize()
                if n:
                    shared[key].append(time.perf_counter() - t0)
        if n:
            log(f"round {n}/{rounds} done")
    return {(i, kind): shared[step_key(r, kind)]
            for i, r in enumerate(recipes) for kind in r.counts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=FLAGS",
                    help="a recipe as `cifarcnn train` flags over the fast model's defaults "
                         "(repeatable; default: the fast recipe itself, 'fast=')")
    ap.add_argument("--airbench", action="store_true",
                    help="also price airbench94_muon's net and schedule (PyTorch's layers)")
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds (default 8)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error(f"--rounds {a.rounds}: give at least 1")
    try:
        # airbench first: the ratios are then to its time, the measure issue 3 sets
        specs = ([AIRBENCH] if a.airbench else []) + (a.recipe or ["fast="])
        recipes = [parse_recipe(s, a.device) for s in specs]
    except CifarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    perf.tune_allocator()  # as the training loop does
    times = timed_steps(recipes, a.rounds, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"\n{'recipe':<20} {'input':>5} {'batch':>5} {'stopped':>7} {'steps':>5} "
          f"{'median ms':>9} {'best ms':>8}")
    for (i, (size, batch, stopped)), t in times.items():
        n = recipes[i].counts[size, batch, stopped]
        print(f"{recipes[i].name:<20} {size:>5} {batch:>5} {stopped:>7} {n:>5} "
              f"{statistics.median(t) * 1e3:>9.1f} {min(t) * 1e3:>8.1f}")
    totals = [[sum(r.counts[kind] * times[i, kind][k] for kind in r.counts)
               for k in range(a.rounds)] for i, r in enumerate(recipes)]
    print(f"\n{'recipe':<20} {'steps':>5} {'est. s':>8} {'range':>17} "
          f"{'/ ' + recipes[0].name[:16]:>18} {'range':>11}")
    for r, t in zip(recipes, totals, strict=True):
        ratios = [x / b for x, b in zip(t, totals[0], strict=True)]
        print(f"{r.name:<20} {sum(r.counts.values()):>5} {statistics.median(t):>8.1f} "
              f"{min(t):>8.1f}-{max(t):<8.1f} {statistics.median(ratios):>18.3f} "
              f"{min(ratios):>5.3f}-{max(ratios):<5.3f}")
    cpu = torch.cuda.get_device_name() if recipes[0].cfg.device == "cuda" else perf.cpu_name()
    print(f"\n{recipes[0].cfg.device} ({cpu}), torch {torch.__version__}, {a.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
