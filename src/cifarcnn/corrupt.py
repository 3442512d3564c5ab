"""Common image corruptions, for accuracy under shift: `evaluate --corrupt NAME:SEVERITY`.

A model's test accuracy says how it does on images like its training
images. Photos in use are noisier, blurrier, darker or more compressed, and
two models with the same clean accuracy can part ways there. These are six
of the corruption families of CIFAR-10-C (Hendrycks and Dietterich, 2019,
"Benchmarking Neural Network Robustness to Common Corruptions"), written
here from their descriptions at five severities each, applied to uint8
images on the fly (deterministic for a seed), so no extra data set is
needed. The parameters are ours: the numbers are comparable between models
measured here, not with published CIFAR-10-C results.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import CifarError

SEVERITIES = 5


def _noise(x: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, `level` the standard deviation as a fraction of 255."""
    return x + rng.normal(0.0, level * 255.0, x.shape)


def _blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian blur of `sigma` pixels (a separable kernel, mirrored borders)."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(0, 3, 1, 2)
    n, c, h, w = t.shape
    t = t.reshape(n * c, 1, h, w)
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return t.reshape(n, c, h, w).permute(0, 2, 3, 1).numpy()


def _contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Each image's pixels pulled towards its mean: `factor` of the contrast kept."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * factor + mean


def _brightness(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Every pixel lighter by `shift` of the full range, clipped at white."""
    return x + shift * 255.0


def _jpeg(x: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """Each image saved as a JPEG of `quality` and decoded again."""
    out = np.empty_like(x)
    for i, img in enumerate(x.astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def _pixelate(x: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Down to `scale` of the side by box averaging, back up by repeating pixels."""
    out = np.empty_like(x)
    side = x.shape[1]
    small = max(1, round(side * scale))
    for i, img in enumerate(x.astype(np.uint8)):
        im = Image.fromarray(img).resize((small, small), Image.Resampling.BOX)
        out[i] = np.asarray(im.resize((side, side), Image.Resampling.NEAREST))
    return out


# name -> (function, its parameter at severities 1..5, mildest first)
CORRUPTIONS: dict[str, tuple[Callable[..., np.ndarray], tuple[float, ...]]] = {
    "gaussian_noise": (_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "gaussian_blur": (_blur, (0.4, 0.6, 0.7, 0.8, 1.0)),
    "contrast": (_contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "brightness": (_brightness, (0.1, 0.2, 0.3, 0.4, 0.5)),
    "jpeg": (_jpeg, (80, 65, 58, 50, 40)),
    "pixelate": (_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
}


def parse(spec: str) -> tuple[str, int]:
    """`NAME:SEVERITY` (or NAME, severity 3) -> (name, severity), checked."""
    name, _, level = spec.partition(":")
    if name not in CORRUPTIONS:
        raise CifarError(f"--corrupt {spec!r}: unknown corruption; choose one of "
                         f"{', '.join(CORRUPTIONS)}, as NAME:SEVERITY (1-{SEVERITIES})")
    try:
        severity = int(level) if level else 3
    except ValueError:
        severity = 0
    if not 1 <= severity <= SEVERITIES:
        raise CifarError(f"--corrupt {spec!r}: the severity is a whole number from 1 (mild) "
                         f"to {SEVERITIES} (harsh), e.g. {name}:3")
    return name, severity


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) images with corruption `name` at `severity` (1-5), as uint8."""
    fn, levels = CORRUPTIONS[name]
    rng = np.random.default_rng(seed)
    out = fn(np.asarray(images, dtype=np.float32), levels[severity - 1], rng)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
