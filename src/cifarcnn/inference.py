"""Evaluation and prediction: the paper's inference mode.

`evaluate_arrays` is the one function both training (for its per-epoch
validation) and `cifarcnn evaluate` use, with the same batch size and
precision, so reloaded weights reproduce the printed accuracy to the image.
"""

from __future__ import annotations

import http.client
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import augment
from .config import amp_dtype, cpu_bf16_pays, resolve_device
from .datasets import CLASSES, MEAN, STD, decode_image
from .distributed import World, all_reduce_sum
from .errors import CifarError
from .weights import load_weights, resolve_weights_path

if TYPE_CHECKING:
    from .export import Exported

# Test-time augmentation: weighted views (weight, flip, shift) whose logits are averaged.
# "flip" is the mirror pair; "flip-shift" adds 1-pixel translations both ways, each at
# half the weight of the untranslated pair, because a translated view loses a border row.
TTA_VIEWS: dict[str, list[tuple[float, bool, int]]] = {
    "none": [(1.0, False, 0)],
    "flip": [(0.5, False, 0), (0.5, True, 0)],
    "flip-shift": [(0.25, False, 0), (0.25, True, 0), (0.125, False, 1), (0.125, True, 1),
                   (0.125, False, -1), (0.125, True, -1)],
}


def tta_mode(name: str | bool | None, default: str = "none") -> str:
    """Normalise a TTA choice: None -> `default`, False -> "none", True -> `default`."""
    if name is None or name is True:
        return default
    if name is False:
        return "none"
    if name not in TTA_VIEWS:
        raise CifarError(f"test-time augmentation {name!r}: choose one of "
                         f"{', '.join(TTA_VIEWS)}")
    return name


def autocast(device: str, precision: str):
    dtype = amp_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


def input_dtype(precision: str) -> torch.dtype:
    """The dtype images are normalised to: what the first layer computes in anyway."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def check_gate(gate: float | None) -> float | None:
    """A TTA gate is a probability in (0, 1); None means every image takes every view."""
    if gate is not None and not 0 < gate < 1:
        raise CifarError(f"TTA gate {gate}: give a single-view confidence between 0 and 1, e.g. "
                         "0.9 (images at least that confident skip the other views)")
    return gate


# Inference batches on a CPU: a batch of 1,000 32x32 images holds 100-200 MB of activations,
# far past the caches, while one of 128 keeps each layer's output near them. On the AVX2
# EPYC of README "A third CPU" (fp32) evaluate ran paper-cnn 1.5-1.8x and fast 1.5x faster at
# 128 than at 1,000, with the same answers (benchmarks/eval_batch.py; README, "Speed").
CPU_EVAL_BATCH = 128


def eval_batch(device: str, batch_size: int) -> int:
    """The batch inference runs in: `batch_size`, capped at CPU_EVAL_BATCH on a CPU."""
    return min(batch_size, CPU_EVAL_BATCH) if device == "cpu" else batch_size


@torch.inference_mode()
def view_logits(model: nn.Module, images: torch.Tensor, *, device: str, precision: str,
                batch_size: int = 1000, channels_last: bool = True, tta: str = "none",
                shard: tuple[int, int] = (0, 1),
                gate: float | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(TTA logits, plain single-view logits, views run), for uint8 NHWC images.

    The logits are (N, C) fp32. The plain ones come free with any TTA (the
    first view is the image itself), so training can report both accuracies
    for one forward pass each. `shard=(rank, world)` keeps every world-th
    batch: under DDP each rank evaluates whole batches, exactly the ones a
    single process would form.

    `gate`: an image whose single view already gives its top class at least
    this probability keeps its single-view logits and skips the other views.
    The views rarely change a confident image's class, so a well-chosen gate
    keeps the TTA's accuracy for half its work or less (README, "Gated TTA").
    The third value counts the image-views run, to report that fraction.
    """
    batch_size = eval_batch(device, batch_size)
    mean = torch.tensor(MEAN, device=device)
    std = torch.tensor(STD, device=device)
    views = TTA_VIEWS[tta]
    assert views[0][1:] == (False, 0), "the first TTA view is the image itself"
    out, plain = [], []
    runs = 0
    rank, world = shard

    def run_views(xb: torch.Tensor, chosen: list[tuple[float, bool, int]]) -> list[torch.Tensor]:
        """Each chosen view's logits. A batch whose views fit in one batch_size runs them
        as one forward pass: for predict's few images and serve's small batches that is
        much faster (`fast` served 2.7x the requests of a lone client: README, "Serving
        over HTTP"); a full evaluation batch runs view by view, as it always has."""
        if len(chosen) > 1 and len(xb) * len(chosen) <= batch_size:
            batches = [torch.cat([augment.view(xb, f, s) for _, f, s in chosen])]
        else:
            batches = [augment.view(xb, f, s) for _, f, s in chosen]
        logits = []
        for x in batches:
            x = augment.normalize(x, mean, std, channels_last, input_dtype(precision))
            with autocast(device, precision):
                logits.extend(model(x).float().split(len(xb)))
        return logits

    def average(chosen: list[tuple[float, bool, int]], logits: list[torch.Tensor]) -> torch.Tensor:
        total = logits[0] * chosen[0][0]
        for (weight, _, _), view in zip(chosen[1:], logits[1:], strict=True):
            total = total + view * weight
        return total

    for i in range(rank * batch_size, len(images), batch_size * world):
        xb = images[i:i + batch_size].to(device, non_blocking=True)
        if gate is None or len(views) == 1:
            logits = run_views(xb, views)
            single = logits[0]
            total = average(views, logits) if len(views) > 1 else single
            runs += len(xb) * len(views)
        else:
            single = run_views(xb, views[:1])[0]
            pick = (single.softmax(1).amax(1) < gate).nonzero().squeeze(1)
            unsure = xb.index_select(0, pick)
            total = single
            if len(unsure):
                logits = [single.index_select(0, pick), *run_views(unsure, views[1:])]
                total = single.index_copy(0, pick, average(views, logits))
            runs += len(xb) + len(unsure) * (len(views) - 1)
        plain.append(single)
        out.append(total)
    if not out:
        empty = torch.empty(0, 10, device=device)
        return empty, empty, 0
    return torch.cat(out), torch.cat(plain), runs


def logits_of(model: nn.Module, images: torch.Tensor, *, device: str, precision: str,
              batch_size: int = 1000, channels_last: bool = True,
              tta: str = "none", gate: float | None = None) -> torch.Tensor:
    """Logits (N, C) in fp32 for uint8 NHWC images, in batches, averaged over TTA views."""
    return view_logits(model, images, device=device, precision=precision,
                       batch_size=batch_size, channels_last=channels_last, tta=tta,
                       gate=gate)[0]


class NonFiniteOutputs(CifarError):
    """Weights that give NaN or infinite logits: diverged in training, or overflowing in
    a narrow precision. No accuracy of them means anything, so evaluation stops."""


def evaluate_arrays(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                    device: str, precision: str, batch_size: int = 1000,
                    channels_last: bool = True, tta: str = "none",
                    world: World | None = None, gate: float | None = None,
                    temperature: float = 1.0, keep_probabilities: bool = False
                    ) -> dict[str, Any]:
    """Loss and accuracy of `model` on a labelled split (model put in eval mode).

    `accuracy`/`loss` use the TTA logits; `accuracy_no_tta` is the single view;
    `views_per_image` is the forward passes run per image (the TTA's view
    count, less with a `gate`); `calibration` compares confidence with accuracy
    (see `calibration`) at the weights' `temperature`, which the loss uses too;
    `confusion[t][p]` counts the images of class t predicted as p; `top5_accuracy`
    counts a label among the five highest scores. NaN or infinite outputs raise
    NonFiniteOutputs: no number computed from them would mean anything. Under DDP
    (`world`) the ranks split the batches and sum their counts, so every rank
    reports what a single process reports for the same weights.
    `keep_probabilities` (one process): also each image's class probabilities,
    (N, C) float32 numpy under "probabilities", for a per-image record.
    """
    world = world or World()
    batch_size = eval_batch(device, batch_size)  # the batches view_logits shards by
    was_training = model.training
    model.eval()
    logits, plain, runs = view_logits(model, images, device=device, precision=precision,
                                      batch_size=batch_size, channels_last=channels_last,
                                      tta=tta, shard=(world.rank, world.size), gate=gate)
    model.train(was_training)
    logits = logits / temperature  # calibrated weights: the loss and calibration of their T
    mine = torch.cat([labels[i:i + batch_size] for i in range(
        world.rank * batch_size, len(labels), batch_size * world.size)] or [labels[:0]])
    mine = mine.to(logits.device)
    classes = logits.shape[1]
    sums = torch.stack([F.cross_entropy(logits, mine, reduction="sum").double(),
                        (logits.argmax(1) == mine).sum().double(),
                        (plain.argmax(1) == mine).sum().double(),
                        torch.tensor(float(runs), dtype=torch.float64, device=logits.device),
                        (~torch.isfinite(logits)).any(1).sum().double(),
                        top_k_correct(logits, mine).double()])
    confusion = torch.bincount(mine * classes + logits.argmax(1), minlength=classes ** 2)
    calib = calibration_sums(logits, mine)
    totals = all_reduce_sum(torch.cat([sums, calib, confusion.double()]), world).tolist()
    loss_sum, correct, correct_plain, runs_sum, broken, correct_top = totals[:len(sums)]
    at = len(sums) + len(calib)
    n = len(labels)
    if broken:  # every rank has the same totals, so every rank raises
        raise NonFiniteOutputs(f"the model's outputs are NaN or infinite for {int(broken):,} "
                               f"of the {n:,} images in {precision}: its weights diverged in "
                               "training, or its values overflow that precision")
    kept = {}
    if keep_probabilities:
        if world.size > 1:
            raise CifarError("per-image probabilities are kept in one process only")
        kept["probabilities"] = torch.softmax(logits.float(), dim=1).cpu().numpy()
    return {**kept, "loss": loss_sum / n if n else float("nan"),
            "accuracy": correct / max(1, n),
            "correct": int(correct), "n": n, "tta": tta,
            f"top{TOP_K}_accuracy": correct_top / max(1, n),
            "accuracy_no_tta": correct_plain / max(1, n),
            "views_per_image": runs_sum / max(1, n),
            "calibration": calibration(totals[len(sums):at]),
            # rows: the true class, columns: the predicted one (with the TTA)
            "confusion": [[int(v) for v in totals[at + r * classes:at + (r + 1) * classes]]
                          for r in range(classes)]}


TOP_K = 5  # the second number CIFAR-100 results give: the label among the 5 likeliest


def top_k_correct(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labels are among their row's TOP_K highest scores (all of them with at
    most TOP_K classes)."""
    k = min(TOP_K, scores.shape[1])
    return (scores.topk(k, dim=1).indices == labels[:, None]).any(1).sum()


CALIBRATION_BINS = 15  # equal-width confidence bins, the usual choice for the ECE


def calibration_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per confidence bin: images, summed top-class probability, correct top classes;
    (3 * CALIBRATION_BINS,) float64, so ranks can sum them before `calibration`."""
    conf, pred = torch.softmax(logits.float(), dim=1).max(1)
    conf = conf.nan_to_num(0.0)  # NaN outputs: counted in the lowest bin, not a crash
    b = (conf * CALIBRATION_BINS).long().clamp(max=CALIBRATION_BINS - 1)
    return torch.cat([torch.bincount(b, weights=w.double(), minlength=CALIBRATION_BINS)
                      for w in (torch.ones_like(conf), conf, (pred == labels).double())])


def calibration(sums: Sequence[float]) -> dict[str, Any]:
    """How far a model's confidence is from its accuracy.

    `ece` (expected calibration error) is the image-weighted mean gap between the
    confidence of each bin and the accuracy in it; `confidence` above `accuracy`
    means an over-confident model. Worth knowing before trusting probabilities,
    e.g. for a TTA gate, which skips images by their confidence."""
    k = CALIBRATION_BINS
    counts, conf, correct = sums[:k], sums[k:2 * k], sums[2 * k:3 * k]
    n = sum(counts)
    bins = [{"from": i / k, "to": (i + 1) / k, "images": int(c),
             "confidence": conf[i] / c if c else None, "accuracy": correct[i] / c if c else None}
            for i, c in enumerate(counts)]
    return {"ece": sum(abs(conf[i] - correct[i]) for i in range(k)) / n if n else float("nan"),
            "confidence": sum(conf) / n if n else float("nan"), "bins": bins}


class Classifier:
    """A trained model ready for inference: `predict(uint8 NHWC images) -> probabilities`."""

    def __init__(self, model: nn.Module, meta: dict[str, Any], device: str, path: Path,
                 tta: str | bool | None = None, tta_gate: float | None = None) -> None:
        self.model = model
        self.meta = meta
        self.device = device
        self.path = path
        self.classes: list[str] = list(meta.get("classes", CLASSES))
        self.precision: str = meta.get("precision", "fp32")
        # Trained on a GPU, or on a CPU where bf16 is fast, served on a CPU where it is not
        # (an emulated bf16 forward ran ~10x slower than fp32's; on an Intel Xeon without AMX
        # native bf16 ran the fast net's six views 1.2-1.7x slower): the weights in fp32.
        if device == "cpu" and (self.precision == "fp16"
                                or (self.precision == "bf16" and not cpu_bf16_pays())):
            self.precision = "fp32"
        self.batch_size: int = int(meta.get("eval_batch_size", 1000))
        self.channels_last: bool = bool(meta.get("channels_last", True))
        # The recipe's TTA (recorded in the weights) applies unless the caller turns it off.
        self.tta: str = tta_mode(tta, default=tta_mode(meta.get("tta", "none")))
        # Off by default: the recorded accuracies are those of every view on every image.
        self.tta_gate: float | None = check_gate(tta_gate)
        # `cifarcnn calibrate`'s fitted temperature: probabilities are softmax(logits / T).
        # A TTA gate still compares the raw single-view probability, so a gate means the same
        # before and after calibrating.
        self.temperature: float = float(meta.get("temperature", 1.0))

    def logits(self, images: np.ndarray | torch.Tensor,
               tta: str | bool | None = None) -> torch.Tensor:
        x = as_batch(images)
        return logits_of(self.model, x, device=self.device, precision=self.precision,
                         batch_size=self.batch_size, channels_last=self.channels_last,
                         tta=tta_mode(tta, self.tta), gate=self.tta_gate)

    def predict(self, images: np.ndarray | torch.Tensor,
                tta: str | bool | None = None) -> np.ndarray:
        """Class probabilities (N, C) as float32 numpy for uint8 images (N, 32, 32, 3).

        `tta`: None uses the classifier's setting, False a single view, or a mode name.
        """
        return torch.softmax(self.logits(images, tta) / self.temperature, dim=1).cpu().numpy()

    def predict_files(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Probabilities for image files of any size or mode (converted to 32x32 RGB)."""
        return self.predict(read_images(paths))

    def evaluate(self, images: np.ndarray, labels: np.ndarray,
                 tta: str | bool | None = None,
                 keep_probabilities: bool = False) -> dict[str, Any]:
        """Accuracy, loss, calibration and confusion on labelled images (see
        `evaluate_arrays`); `keep_probabilities`: each image's too."""
        labels = np.asarray(labels)
        # checked here: PyTorch's own errors would name neither the argument nor the fix
        if (labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu"
                or (len(labels) and not 0 <= labels.min() <= labels.max() < len(self.classes))):
            raise CifarError(f"labels must be whole numbers 0-{len(self.classes) - 1}, one per "
                             f"image: got {labels.dtype} of shape {labels.shape} for "
                             f"{len(images)} images")
        r = evaluate_arrays(self.model, torch.from_numpy(np.ascontiguousarray(images)),
                            torch.from_numpy(labels.astype(np.int64)),
                            device=self.device, precision=self.precision,
                            batch_size=self.batch_size, channels_last=self.channels_last,
                            tta=tta_mode(tta, self.tta), gate=self.tta_gate,
                            temperature=self.temperature,
                            keep_probabilities=keep_probabilities)
        r["per_class_accuracy"] = per_class_accuracy(r["confusion"], self.classes)
        return r


def per_class_accuracy(confusion: list[list[int]], classes: Sequence[str]) -> dict[str, Any]:
    """Each class's accuracy from a confusion matrix (rows: true class); a class with no
    images has None, not a 0% it never earned."""
    return {c: row[i] / sum(row) if sum(row) else None
            for i, (c, row) in enumerate(zip(classes, confusion, strict=True))}


def check_top(k: int) -> int:
    if k < 1:
        raise CifarError(f"--top {k}: show at least 1 class per image")
    return k


def top_classes(probs: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    """One image's k most probable classes, most probable first, as predict and serve
    give them."""
    return [{"class": classes[i], "probability": float(probs[i])}
            for i in np.argsort(probs)[::-1][:check_top(k)]]


URL_SCHEMES = ("http://", "https://")
MAX_URL_BYTES = 50 << 20  # an image behind a URL larger than this is refused


def is_url(p: str | os.PathLike) -> bool:
    return isinstance(p, str) and p.lower().startswith(URL_SCHEMES)


def fetch_image_bytes(url: str, timeout: float = 30.0) -> bytes:
    """The body at an http(s) URL, for `predict URL`: at most MAX_URL_BYTES, each failure
    one line that names the URL."""
    import urllib.error
    import urllib.request

    from . import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"cifarcnn/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            data = r.read(MAX_URL_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise CifarError(f"{url}: the server answered HTTP {e.code} {e.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:
        why = e.reason if isinstance(e, urllib.error.URLError) else e
        raise CifarError(f"{url}: cannot fetch it ({why}); check the address and the "
                         "network") from None
    if len(data) > MAX_URL_BYTES:
        raise CifarError(f"{url}: more than {MAX_URL_BYTES >> 20} MB; not an image to "
                         "classify")
    return data


def image_files(paths: Sequence[str | os.PathLike]) -> list[Path | str]:
    """The files to classify: each path as given, a folder as the image files under it.

    A folder's files are those whose suffix names a format PIL reads (.png,
    .jpg, ...), in sorted order at any depth, so `predict photos/` does what a
    shell glob would, without one; other files there (notes, PDFs) are passed
    over. `-` is one image read from standard input (`curl ... | cifarcnn
    predict -`), and an http(s) URL is fetched when read (`predict https://...`).
    """
    from PIL import Image

    # the suffixes of formats PIL can read, not only write (.pdf, .palm)
    suffixes = {ext.lower() for ext, fmt in Image.registered_extensions().items()
                if fmt in Image.OPEN}
    files: list[Path | str] = []
    if sum(str(p) == "-" for p in paths) > 1:
        raise CifarError("- (standard input) given twice: it holds one image")
    for given in paths:
        if is_url(given):
            files.append(str(given))  # kept as text: a Path would fold its //
            continue
        p = Path(given)
        if not p.is_dir():
            files.append(p)
            continue
        found = sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes and f.is_file())
        if not found:
            raise CifarError(f"{p}: a folder with no image files in it (looked for "
                             ".png, .jpg, .bmp and the other formats PIL reads, at any depth)")
        files.extend(found)
    return files


def read_images(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Image files of any size or mode as one uint8 (N, 32, 32, 3) batch.

    Decoding a photo and shrinking it to 32x32 costs ~8x the classifying (paper-cnn), and
    PIL lets go of the GIL while it does both, so the files are read on a thread per core:
    1.8x faster on 2 cores for a folder of 2,000 640x480 JPEGs. The first bad file in
    order is the one reported, as one by one, and reading stops there.
    """

    def one(p: str | os.PathLike) -> np.ndarray:
        if is_url(p):
            return decode_image(fetch_image_bytes(str(p)), str(p))
        try:
            data = sys.stdin.buffer.read() if str(p) == "-" else Path(p).read_bytes()
        except OSError as e:
            raise CifarError(f"{p}: cannot read the image ({e.strerror})") from None
        return decode_image(data, str(p))

    workers = min(len(paths), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count() or 1)
    if workers <= 1:
        return np.stack([one(p) for p in paths])
    pool = ThreadPoolExecutor(workers)
    try:
        return np.stack(list(pool.map(one, paths)))
    finally:
        pool.shutdown(cancel_futures=True)


def as_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) as a tensor: one image (32, 32, 3) or a list of them too."""
    if isinstance(images, (list, tuple)):  # torch warns that a list of arrays is slow
        try:
            images = np.stack([np.asarray(i) for i in images]) if len(images) else np.zeros(
                (0, 32, 32, 3), np.uint8)
        except ValueError:
            raise CifarError("images of different shapes; each must be uint8 (32, 32, 3) "
                             "(predict_files(paths) resizes photos of any size)") from None
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or tuple(x.shape[1:]) != (32, 32, 3) or x.dtype != torch.uint8:
        hint = ""
        if x.ndim == 4 and tuple(x.shape[1:]) == (3, 32, 32):
            hint = "; channels come last: images.transpose(0, 2, 3, 1)"
        elif x.ndim == 4 and x.shape[-1] == 3 and x.dtype == torch.uint8:
            hint = "; for photos of any size, predict_files(paths) resizes them"
        elif x.is_floating_point():
            hint = "; floats in [0, 1]: (images * 255).round().astype(np.uint8)"
        raise CifarError(f"images must be uint8 of shape (N, 32, 32, 3), got {x.dtype} "
                         f"{tuple(x.shape)}{hint}")
    return x


def load(path: str | os.PathLike = "paper-cnn", device: str = "auto",
         tta: str | bool | None = None, tta_gate: float | None = None) -> Classifier | Exported:
    """Load a classifier from a weights file, a run directory, or a shipped model name.

    `tta`: None or True applies the test-time augmentation recorded with the
    weights (the model's recipe), False turns it off, a mode name overrides it.
    `tta_gate`: run the TTA's extra views only on images whose single view is
    less confident than this (see `view_logits`); None runs them on all.
    A TorchScript or ONNX file written by `cifarcnn export` loads too.
    """
    dev = resolve_device(device)
    p = resolve_weights_path(path)
    check_gate(tta_gate)
    if p.suffix.lower() in (".onnx", ".pt", ".ts"):  # a `cifarcnn export` file
        from .export import load_exported

        if tta_gate is not None:
            raise CifarError(f"{p}: an exported file runs its TTA views inside its graph, on "
                             "every image; a TTA gate needs the safetensors weights")
        return load_exported(p)
    model, meta = load_weights(p, device=dev)
    return Classifier(model, meta, dev, p, tta=tta, tta_gate=tta_gate)
