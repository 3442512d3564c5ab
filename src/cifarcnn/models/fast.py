"""Fast: a small ResNet-free net built for speed per accuracy point (airbench's lineage).

The ideas come from the fastest public CIFAR-10 trainings (Page's ResNet-9,
hlb-CIFAR10, Keller Jordan's airbench), rewritten here: a first layer that
whitens 2x2 patches, initialised from the training data's patch covariance
and frozen, so the network starts from decorrelated inputs; three conv
groups (conv, max-pool, BatchNorm, GELU, conv, BatchNorm, GELU) that halve
the resolution each time; a global max-pool and a linear head scaled down
so early logits stay small; label smoothing; test-time flips and shifts.
Widths and epochs were chosen for a 2-core CPU (see README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RECIPE = {
    "epochs": 10,
    "batch_size": 512,
    "optimizer": "sgd",
    "lr": 0.4,
    "momentum": 0.85,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "warmup_epochs": 1.0,
    "label_smoothing": 0.2,
    "tta": "flip-shift",
}

PATCH = 2  # the whitening layer sees 2x2 patches: 12 input dimensions


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.bn2(self.conv2(x)))


class FastNet(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (64, 128, 256), num_classes: int = 10,
                 head_scale: float = 1 / 9, bn_momentum: float = 0.4) -> None:
        super().__init__()
        dims = 3 * PATCH * PATCH
        self.whiten = nn.Conv2d(3, 2 * dims, PATCH, padding=0)
        self.whiten.weight.requires_grad_(False)
        self.whiten.bias.requires_grad_(False)
        w1, w2, w3 = widths
        self.groups = nn.Sequential(ConvGroup(2 * dims, w1, bn_momentum),
                                    ConvGroup(w1, w2, bn_momentum),
                                    ConvGroup(w2, w3, bn_momentum))
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.head_scale = head_scale
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.whiten:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training images (N, 3, H, W).

        The 12 eigenvectors of the 2x2x3 patch covariance, each scaled by
        1/sqrt(eigenvalue), make the layer's outputs decorrelated with unit
        variance; the filters appear with both signs so the GELU after them
        loses nothing. The bias centres the patches.
        """
        x = images.float()
        patches = F.unfold(x, PATCH).transpose(1, 2).reshape(-1, 3 * PATCH * PATCH)
        mean = patches.mean(0)
        cov = torch.cov((patches - mean).T)
        eigval, eigvec = torch.linalg.eigh(cov)
        w = eigvec.T / torch.sqrt(eigval + eps)[:, None]  # (12, 12): rows are filters
        w = torch.cat([w, -w])  # (24, 12)
        # unfold orders a patch as (channel, row, col), the same as a conv weight's layout
        self.whiten.weight.copy_(w.view(-1, 3, PATCH, PATCH))
        self.whiten.bias.copy_(-(w @ mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.groups(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.head_scale
