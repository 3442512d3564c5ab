"""Evaluation and prediction: the paper's inference mode.

`evaluate_arrays` is the one function both training (for its per-epoch
validation) and `cifarcnn evaluate` use, with the same batch size and
precision, so reloaded weights reproduce the printed accuracy to the image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import augment
from .config import amp_dtype, resolve_device
from .datasets import CLASSES, MEAN, STD, decode_image
from .errors import CifarError
from .weights import load_weights, resolve_weights_path


def autocast(device: str, precision: str):
    dtype = amp_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


@torch.inference_mode()
def logits_of(model: nn.Module, images: torch.Tensor, *, device: str, precision: str,
              batch_size: int = 1000, channels_last: bool = True) -> torch.Tensor:
    """Logits (N, C) in fp32 for uint8 NHWC images, in batches."""
    mean = torch.tensor(MEAN, device=device)
    std = torch.tensor(STD, device=device)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, non_blocking=True)
        x = augment.normalize(x, mean, std, channels_last)
        with autocast(device, precision):
            out.append(model(x).float())
    if not out:
        return torch.empty(0, 10, device=device)
    return torch.cat(out)


def evaluate_arrays(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                    device: str, precision: str, batch_size: int = 1000,
                    channels_last: bool = True) -> dict[str, float]:
    """Loss and accuracy of `model` on a labelled split (model put in eval mode)."""
    was_training = model.training
    model.eval()
    logits = logits_of(model, images, device=device, precision=precision,
                       batch_size=batch_size, channels_last=channels_last)
    labels = labels.to(logits.device)
    model.train(was_training)
    correct = int((logits.argmax(1) == labels).sum())
    return {"loss": float(F.cross_entropy(logits, labels)) if len(labels) else float("nan"),
            "accuracy": correct / max(1, len(labels)), "correct": correct, "n": len(labels)}


class Classifier:
    """A trained model ready for inference: `predict(uint8 NHWC images) -> probabilities`."""

    def __init__(self, model: nn.Module, meta: dict[str, Any], device: str, path: Path) -> None:
        self.model = model
        self.meta = meta
        self.device = device
        self.path = path
        self.classes: list[str] = list(meta.get("classes", CLASSES))
        self.precision: str = meta.get("precision", "fp32")
        if self.precision == "fp16" and device == "cpu":  # trained on a GPU, served on CPU
            self.precision = "fp32"
        self.batch_size: int = int(meta.get("eval_batch_size", 1000))
        self.channels_last: bool = bool(meta.get("channels_last", True))

    def logits(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = _as_batch(images)
        return logits_of(self.model, x, device=self.device, precision=self.precision,
                         batch_size=self.batch_size, channels_last=self.channels_last)

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class probabilities (N, C) as float32 numpy for uint8 images (N, 32, 32, 3)."""
        return torch.softmax(self.logits(images), dim=1).cpu().numpy()

    def predict_files(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Probabilities for image files of any size or mode (converted to 32x32 RGB)."""
        batch = []
        for p in paths:
            try:
                data = Path(p).read_bytes()
            except OSError as e:
                raise CifarError(f"{p}: cannot read the image ({e.strerror})") from None
            batch.append(decode_image(data, str(p)))
        return self.predict(np.stack(batch))

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return evaluate_arrays(self.model, torch.from_numpy(np.ascontiguousarray(images)),
                               torch.from_numpy(np.asarray(labels, dtype=np.int64)),
                               device=self.device, precision=self.precision,
                               batch_size=self.batch_size, channels_last=self.channels_last)


def _as_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or tuple(x.shape[1:]) != (32, 32, 3) or x.dtype != torch.uint8:
        raise CifarError(f"images must be uint8 of shape (N, 32, 32, 3), got {x.dtype} "
                         f"{tuple(x.shape)}")
    return x


def load(path: str | os.PathLike = "paper-cnn", device: str = "auto") -> Classifier:
    """Load a classifier from a weights file, a run directory, or a shipped model name."""
    dev = resolve_device(device)
    p = resolve_weights_path(path)
    model, meta = load_weights(p, device=dev)
    return Classifier(model, meta, dev, p)
