"""The training input pipeline: whole batches, tensor ops, data resident on the device.

The split lives on the training device as one uint8 NHWC tensor, padded once
by 4 pixels. Each epoch draws its whole plan up front (the permutation, a
crop offset and a flip bit per image) from a generator seeded by (seed,
epoch): a batch is then one gather that crops and flips every image at once,
and resuming mid-epoch or sharding across ranks is only slicing that plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD = 4  # the classic recipe's translation; models' recipes may choose another


@dataclass
class EpochPlan:
    order: torch.Tensor  # permutation of the training indices
    dx: torch.Tensor  # crop offsets in [0, 2*translate], per position in `order`
    dy: torch.Tensor
    flip: torch.Tensor  # bool

    def subset(self, chosen: torch.Tensor) -> EpochPlan:
        """The plan restricted to the images where `chosen` (a mask over all images) is
        True, in the same order, each keeping its crop and flip."""
        keep = chosen[self.order]
        return EpochPlan(self.order[keep], self.dx[keep], self.dy[keep], self.flip[keep])


def epoch_plan(n: int, seed: int, epoch: int, augment: bool = True, translate: int = PAD,
               flip: str = "random", shrink: int = 0) -> EpochPlan:
    """The same (seed, epoch) gives the same plan on every machine and every rank.

    flip="alternate" (airbench's trick) draws one coin per image for the whole
    run and mirrors exactly the other half of the images every odd epoch, so
    any two consecutive epochs show each image both ways: less repetition
    than independent coins, which matters when a run lasts a few epochs.
    "alternate-seen" plans the same here; the training loop then keys each
    image's mirroring to the times it was trained on (`flips_by_times_seen`).
    `shrink` > 0 plans crops that many pixels smaller than the images (see
    TrainConfig.low_res): their offsets range over the extra room too.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    if augment:
        dx = torch.randint(0, 2 * translate + shrink + 1, (n,), generator=g)
        dy = torch.randint(0, 2 * translate + shrink + 1, (n,), generator=g)
        if flip in ("alternate", "alternate-seen"):
            flips = flip_coins(n, seed)[order] ^ bool(epoch % 2)
        else:
            flips = torch.rand(n, generator=g) < 0.5
    else:
        dx = dy = torch.full((n,), translate + shrink // 2)
        flips = torch.zeros(n, dtype=torch.bool)
    return EpochPlan(order, dx, dy, flips)


def flip_coins(n: int, seed: int) -> torch.Tensor:
    """The alternating flips' one coin per image for the whole run."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5


def flips_by_times_seen(plan: EpochPlan, seed: int, times: torch.Tensor) -> EpochPlan:
    """The plan with each image mirrored on every other time it is trained on.

    flip="alternate" keys the mirroring to the epoch's parity, so under loss-based
    selection an image trained on in epochs 5 and 7 but skipped in 6 is shown the
    same way twice; keyed to `times` (how often each image was trained on before
    this epoch), every two showings of an image are one each way. While every
    epoch trains on every image the two agree.
    """
    flips = flip_coins(len(times), seed)[plan.order] ^ (times[plan.order] % 2 == 1)
    return EpochPlan(plan.order, plan.dx, plan.dy, flips)


def pad_images(images: torch.Tensor, pad: int = PAD, mode: str = "zeros") -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, H+2pad, W+2pad, C), done once per run.

    mode "zeros" gives black borders; "reflect" mirrors the edge pixels, so a
    translated image never shows a border the test images lack.
    """
    if mode == "zeros":
        return F.pad(images, (0, 0, pad, pad, pad, pad))
    h, w = images.shape[1:3]
    rows = _reflect(torch.arange(-pad, h + pad, device=images.device), h)
    cols = _reflect(torch.arange(-pad, w + pad, device=images.device), w)
    return images.index_select(1, rows).index_select(2, cols)


def crop_flip(padded: torch.Tensor, idx: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
              flip: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Crop a size x size window at (dy, dx) of each padded image idx, mirrored where flip.

    One gather of whole pixels for the batch: rows and columns are per-image
    index vectors (a flip just reverses the column vector), turned into flat
    pixel indices for `index_select`, which is ~5x faster on CPU than the
    equivalent three-tensor advanced indexing.
    """
    n, h, w, c = padded.shape
    ar = torch.arange(size, device=padded.device)
    rows = dy[:, None] + ar
    cols = torch.where(flip[:, None], dx[:, None] + (size - 1) - ar, dx[:, None] + ar)
    flat = (idx[:, None, None] * (h * w) + rows[:, :, None] * w + cols[:, None, :]).reshape(-1)
    return padded.reshape(n * h * w, c).index_select(0, flat).view(len(idx), size, size, c)


def add_noise(images: torch.Tensor, max_std: float, seed: int) -> torch.Tensor:
    """uint8 NHWC images with Gaussian pixel noise, rounded and clipped back to uint8.

    Each image draws its own standard deviation uniformly from [0, max_std] (a
    fraction of the 0-255 range), so the batch spans clean to noisy and the net
    does not learn that every image is noisy. Returned as uint8, like a noisy
    photo, it goes through the same normalisation as any other batch. Seeded per
    step (`seed`), so a resumed run adds the same noise.
    """
    g = torch.Generator(device=images.device).manual_seed(seed)
    n = images.shape[0]
    level = torch.rand((n, 1, 1, 1), generator=g, device=images.device) * (max_std * 255.0)
    noise = torch.randn(images.shape, generator=g, device=images.device).mul_(level)
    return noise.add_(images).round_().clamp_(0, 255).to(torch.uint8)


def noise_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A distinct seed for each (run seed, epoch, step, rank): each batch shard its own noise
    (epoch -1: the whitening's sample). Kept below 2**63, which any generator accepts."""
    return (((seed * 100_003 + epoch) * 1_000_003 + step) * 1_009 + rank) % 2**63


def view(images: torch.Tensor, flip: bool, shift: int | tuple[int, int]) -> torch.Tensor:
    """One test-time view of uint8 NHWC images: mirrored and/or moved `shift` pixels.

    An int shift moves content down-right (> 0) or up-left (< 0) by that many
    pixels on both axes; a (rows, cols) pair moves each axis on its own. The
    uncovered border is filled by reflection, so no view shows black bars the
    network never saw in training.
    """
    dy, dx = (shift, shift) if isinstance(shift, int) else shift
    if dy or dx:
        h, w = images.shape[1:3]
        rows = _reflect(torch.arange(h, device=images.device) - dy, h)
        cols = _reflect(torch.arange(w, device=images.device) - dx, w)
        images = images.index_select(1, rows).index_select(2, cols)
    return images.flip(2) if flip else images


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    i = torch.where(i < 0, -i, i)
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC -> NCHW in `dtype`, (x/255 - mean) / std.

    Permuting NHWC to NCHW gives channels_last strides for free; with
    channels_last off we pay for one copy to the classic layout. Under bf16
    autocast the first layer would cast its input to bf16 anyway, so the
    caller asks for bf16 here and saves a full-size fp32 pass.
    """
    x = images.to(dtype)
    x.sub_(mean * 255.0).div_(std * 255.0)  # in place: one fresh buffer, not three
    x = x.permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def shrink(images: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised NCHW images resized to size x size (bilinear with antialiasing, so each
    output pixel averages the input pixels it covers), in their dtype and memory layout.

    Computed in fp32: a batch of 32x32 images costs a few milliseconds, and the
    antialiased kernels do not take bf16 on every device.
    """
    channels_last = images.is_contiguous(memory_format=torch.channels_last)
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False).to(images.dtype)
    return out.contiguous(memory_format=torch.channels_last if channels_last
                          else torch.contiguous_format)


def hardest(losses: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k images with the highest remembered loss (ties: the lower index first).

    The stable sort makes the choice a function of `losses` alone, so a resumed
    run and every DDP rank pick exactly the same images.
    """
    top = torch.sort(losses, descending=True, stable=True).indices[:k]
    chosen = torch.zeros(len(losses), dtype=torch.bool, device=losses.device)
    chosen[top] = True
    return chosen
