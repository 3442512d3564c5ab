"""Temperature scaling: class probabilities that mean what they say.

A trained net's softmax is rarely calibrated: the `fast` recipe's label
smoothing leaves it under-confident (70% mean confidence at 90% accuracy),
and long plain training tends the other way. Dividing the logits by one
number T, fitted to minimise the negative log-likelihood of labelled
images, removes most of that gap without changing any image's top class
(Guo et al. 2017, "On Calibration of Modern Neural Networks"). The fitted
T is stored in the weights' metadata, and `predict`, `serve`, `evaluate`,
`cifarcnn.load` and exports apply it from then on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import CifarData, balanced_subset
from .errors import CifarError
from .inference import Classifier, calibration, calibration_sums
from .weights import SHIPPED, read_meta, rewrite_meta

# val: the images the run validated on, its --holdout images if it had them, else the test
# images (the project's validation set, as in the paper); train: biased, the net fits them
SPLITS = ("val", "train", "test")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising the mean NLL of softmax(logits / T).

    The NLL is convex in 1/T, so a one-dimensional quasi-Newton search on
    log T (which keeps T positive) finds the one minimum."""
    x, y = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t) or not 1e-3 <= t <= 1e3:
        raise CifarError(f"the fitted temperature {t:g} is out of range: the images are too "
                         "few, or the model predicts every one of them right with certainty")
    return t


def split_images(clf: Classifier, data: CifarData, split: str) -> tuple[str, np.ndarray,
                                                                       np.ndarray]:
    """(what the images are, images, labels) for a --split name."""
    if split not in SPLITS:
        raise CifarError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    held = clf.meta.get("holdout", 0)
    if split == "val" and held:
        from .train import HOLDOUT_SEED

        if type(held) is not int or not 0 < held < len(data.train_labels):
            raise CifarError(f"{clf.path}: metadata field 'holdout' is {held!r}, not a count of "
                             "training images; the file is damaged or was edited by hand")
        keep = balanced_subset(data.train_labels, held, seed=HOLDOUT_SEED)
        return "held-out training", data.train_images[keep], data.train_labels[keep]
    if split == "train":
        return "train", data.train_images, data.train_labels
    return "test", data.test_images, data.test_labels


def calibrate(clf: Classifier, data: CifarData, split: str = "val",
              images: int = 10_000) -> dict[str, Any]:
    """Fit the temperature of `clf` (with its TTA) on up to `images` class-balanced images
    of `split`; returns the fit's numbers. The classifier applies it at once."""
    split, x, y = split_images(clf, data, split)
    if images < len(y):
        keep = balanced_subset(y, images)
        x, y = x[keep], y[keep]
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    logits = clf.logits(x).float().cpu()
    t = fit_temperature(logits, labels)

    def scores(temperature: float) -> tuple[float, float]:
        z = logits / temperature
        return (float(F.cross_entropy(z, labels)),
                calibration(calibration_sums(z, labels).tolist())["ece"])

    (nll0, ece0), (nll1, ece1) = scores(clf.temperature), scores(t)
    clf.temperature = t
    return {"temperature": t, "split": split, "images": len(y), "tta": clf.tta,
            "nll_before": nll0, "nll_after": nll1, "ece_before": ece0, "ece_after": ece1}


def output_path(weights: Path, out: Path | None) -> Path:
    """Where the calibrated weights go, checked before any work: `out`, or the weights
    file itself; shipped weights are never changed in place."""
    weights = weights.resolve()
    if out is None:
        if weights.parent == SHIPPED.resolve():
            raise CifarError(f"{weights.name} is a shipped model's weights, which are not "
                             "changed in place; give --out FILE.safetensors")
        return weights
    if out.suffix != ".safetensors":
        raise CifarError(f"--out {out}: give a .safetensors file")
    if not out.parent.is_dir():
        raise CifarError(f"--out {out}: folder {out.parent} does not exist; create it or "
                         "choose another path")
    return out


def save_temperature(weights: Path, fit: dict[str, Any], out: Path) -> None:
    """The weights again, their tensors unchanged, with the fit in their metadata; written
    atomically, so an interrupted write leaves the old file whole."""
    meta = read_meta(weights)
    meta["temperature"] = fit["temperature"]
    meta["temperature_fit"] = {k: v for k, v in fit.items() if k != "temperature"}
    rewrite_meta(weights, out, meta)
