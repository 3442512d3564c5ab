"""Data-parallel training through torchrun: PyTorch's own engine, nothing new.

`torchrun --nproc_per_node N -m cifarcnn train ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; `setup()` reads them and joins the process group (NCCL on CUDA,
gloo on CPU). Without them it returns a world of one and nothing changes.

Sharding: every rank draws the same epoch plan from (seed, epoch). A step
takes the next `batch_size * world` positions of the permutation and rank r
trains on the r-th of `world` near-equal pieces of it, so within an epoch no
image is seen twice and none is skipped, except when the epoch's last global
batch has fewer images than there are ranks (then those < world images are
left out, so that no rank steps on an empty batch).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import CifarError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only one that prints, and writes metrics, checkpoints and weights."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1 or dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str, timeout_s: float = 300.0) -> World:
    """Join the process group torchrun described; a world of one when not under torchrun.

    `timeout_s` bounds every collective: a rank that died or hangs makes the
    others fail with an error after that long instead of waiting forever
    (torchrun also stops the whole job as soon as one rank exits with an error).
    """
    if not launched_by_torchrun():
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # rendezvous failures come in many types
            raise CifarError(f"cannot join the torchrun process group as rank {rank} of "
                             f"{size} ({e}); check --rdzv-endpoint and that every node "
                             "runs the same command") from None
    return World(rank, size, local)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(start: int, stop: int, world: World) -> slice:
    """This rank's contiguous piece of the global batch [start, stop) of the epoch plan.

    The pieces of all ranks are disjoint and cover [start, stop); their sizes
    differ by at most one (the same split as `torch.tensor_split`).
    """
    q, r = divmod(stop - start, world.size)
    a = start + world.rank * q + min(world.rank, r)
    return slice(a, a + q + (1 if world.rank < r else 0))


def global_steps(n: int, batch_size: int, world: World) -> int:
    """Steps per epoch: global batches of batch_size * world, the last one partial.

    A final partial global batch with fewer images than ranks is dropped (the
    documented remainder), so every rank trains on at least one image a step.
    """
    global_batch = batch_size * world.size
    full, rest = divmod(n, global_batch)
    return full + (1 if rest >= world.size else 0)


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's value of `obj` on every rank (e.g. the run directory it chose)."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (e.g. RNG states for a checkpoint)."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
