"""The paper's "previous project": the same pipeline with no convolutions (an MLP).

The paper compares its CNN against this baseline (its Fig. 3/4, ~40%
validation accuracy). It sees the flattened 3x32x32 image, so it cannot
share weights across positions; that is the point of the comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RECIPE = {
    "epochs": 25,
    "batch_size": 256,
    "optimizer": "sgd",
    "lr": 0.02,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "warmup_epochs": 2.0,
    "label_smoothing": 0.1,
}


class PaperMLP(nn.Module):
    def __init__(
        self,
        hidden: tuple[int, int] = (1024, 512),
        dropout: float = 0.3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 32 * 32, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        for m in (self.fc1, self.fc2, self.fc3):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.fc3.weight.device, non_blocking=True)
        x = torch.flatten(x, 1)
        x = self.dropout1(F.relu(self.fc1(x)))
        x = self.dropout2(F.relu(self.fc2(x)))
        return self.fc3(x)
