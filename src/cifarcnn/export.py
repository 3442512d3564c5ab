"""Exports people deploy with: TorchScript and ONNX, proven equal to eager.

An exported file takes what `predict` takes, a batch of uint8 images
(N, 32, 32, 3) with a dynamic N, and returns class probabilities (N, C):
normalisation, and the test-time augmentation recorded with the weights,
are inside the graph, so a deployment needs no Python from this project.
The graph computes in fp32, the portable precision.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .datasets import MEAN, STD
from .errors import CifarError
from .inference import (
    TTA_VIEWS,
    Classifier,
    as_batch,
    calibration,
    calibration_sums,
    eval_batch,
    per_class_accuracy,
    read_images,
)
from .weights import check_meta

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
META_KEY = "cifarcnn.json"  # TorchScript extra file / ONNX metadata key
TOLERANCE = 1e-4  # max |p_export - p_eager| on probabilities, both fp32


class Deployable(nn.Module):
    """uint8 NHWC images -> probabilities, with normalisation and TTA views inside."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], tta: str,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)  # a constant in the graph
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (torch.tensor(std).view(1, 3, 1, 1) * 255.0))
        self.views = TTA_VIEWS[tta]
        # Index vectors for the 1-pixel translations (reflected at the border), as buffers
        # so both TorchScript and ONNX see constants rather than Python.
        ar = torch.arange(32)
        for s in {shift for _, _, shift in self.views if shift}:
            i = ar - s
            i = torch.where(i < 0, -i, i)
            i = torch.where(i >= 32, 62 - i, i)
            self.register_buffer(f"idx_{'p' if s > 0 else 'm'}{abs(s)}", i)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() - self.shift) * self.scale
        total = torch.zeros((), dtype=x.dtype)
        for weight, flip, shift in self.views:
            v = x
            if shift:
                idx = getattr(self, f"idx_{'p' if shift > 0 else 'm'}{abs(shift)}")
                v = v.index_select(2, idx).index_select(3, idx)
            if flip:
                v = v.flip(3)
            total = total + weight * self.model(v)
        return F.softmax(total / self.temperature, dim=1)


def export(clf: Classifier, fmt: str, out: Path | None = None,
           check_images: np.ndarray | None = None) -> dict[str, Any]:
    """Write `clf` as `fmt`, reload it, compare with eager; returns what was checked."""
    if fmt not in FORMATS:
        raise CifarError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out) if out else clf.path.with_name(clf.path.stem + FORMATS[fmt])
    allowed = (".pt", ".ts") if fmt == "torchscript" else (".onnx",)
    if out.suffix.lower() not in allowed:
        raise CifarError(f"--out {out}: a {fmt} file must end in {' or '.join(allowed)} "
                         "(that is how predict and evaluate recognise it)")
    model = clf.model.float().to(memory_format=torch.contiguous_format).cpu().eval()
    net = Deployable(model, clf.meta.get("mean", MEAN), clf.meta.get("std", STD), clf.tta,
                     clf.temperature).eval()
    meta = {**{k: clf.meta[k] for k in ("model", "classes", "val_accuracy", "seed") if k in
               clf.meta}, "tta": clf.tta, "temperature": clf.temperature,
            "input": "uint8 (N, 32, 32, 3) RGB",
            "output": "probabilities (N, C)"}
    if not out.parent.is_dir():
        raise CifarError(f"--out {out}: cannot write (folder {out.parent} does not exist); "
                         "create it or choose another path")
    if check_images is not None and len(check_images) == 0:
        raise CifarError("--check-images 0: check at least 1 image, or pass --no-check")
    example = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    # the temporary file keeps the suffix, so it is checked (loaded by suffix) before
    # it replaces `out`: a failed write or check leaves any earlier export untouched
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
    try:
        try:
            if fmt == "torchscript":
                with torch.no_grad():
                    graph = torch.jit.trace(net, example, check_trace=False)
                torch.jit.save(graph, str(tmp), _extra_files={META_KEY: json.dumps(meta)})
            else:
                _export_onnx(net, example, tmp, meta)
        except (OSError, RuntimeError) as e:  # torch.jit.save reports I/O as RuntimeError
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise CifarError(f"--out {out}: cannot write ({why}); choose a writable path"
                             ) from None
        report: dict[str, Any] = {"file": str(out), "format": fmt, "bytes": tmp.stat().st_size,
                                  "tolerance": TOLERANCE}
        if check_images is not None:
            with torch.no_grad():
                expected = net(torch.from_numpy(np.ascontiguousarray(check_images))).numpy()
            got = load_exported(tmp).predict(check_images)
            report["checked_images"] = len(check_images)
            report["max_abs_diff"] = float(np.abs(got - expected).max())
            report["same_top1"] = float((got.argmax(1) == expected.argmax(1)).mean())
            if report["max_abs_diff"] > TOLERANCE:
                raise CifarError(f"{out}: exported outputs differ from eager by "
                                 f"{report['max_abs_diff']:.2e} (> {TOLERANCE:g}); not written")
        try:
            os.replace(tmp, out)
        except OSError as e:
            raise CifarError(f"--out {out}: cannot write ({e.strerror}); choose a writable "
                             "path") from None
    finally:
        tmp.unlink(missing_ok=True)
    return report


def _export_onnx(net: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise CifarError("ONNX export needs the optional packages: "
                         "pip install 'cifarcnn[export]'") from None
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    quiet_logger = logging.getLogger("torch.onnx")
    level = quiet_logger.level
    quiet_logger.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter narrates every pass
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=["images"],
                                    output_names=["probabilities"],
                                    dynamic_shapes={"images": {0: batch}}, verbose=False)
    quiet_logger.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.save(proto, str(path))


class Exported:
    """A TorchScript or ONNX export, used like a Classifier for predict and evaluate."""

    def __init__(self, path: Path, meta: dict[str, Any], run, cpu_batches: bool) -> None:
        """`cpu_batches`: run in a CPU's inference batches (TorchScript: 1.9x faster at 128
        than at 1,000, benchmarks/eval_batch.py), else in batches of 1,000 (ONNX Runtime,
        which plans its own memory, ran 128 no faster)."""
        self.path = path
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.tta: str = meta.get("tta", "none")
        self.tta_gate: float | None = None  # the graph runs every view on every image
        self.temperature = float(meta.get("temperature", 1.0))  # inside the graph
        self._run = run
        self.cpu_batches = cpu_batches

    def predict(self, images: np.ndarray, tta: str | bool | None = None) -> np.ndarray:
        if tta not in (None, True, self.tta):
            raise CifarError(f"{self.path}: an exported file has its TTA ({self.tta}) built "
                             "in; export again with the TTA you want")
        x = as_batch(images).numpy()
        step = eval_batch("cpu", 1000) if self.cpu_batches else 1000
        return np.concatenate([self._run(x[i:i + step]) for i in range(0, len(x), step)]
                              or [np.zeros((0, len(self.classes)), np.float32)])

    def predict_files(self, paths) -> np.ndarray:
        return self.predict(read_images(paths))

    def evaluate(self, images: np.ndarray, labels: np.ndarray,
                 tta: str | bool | None = None) -> dict[str, Any]:
        probs = self.predict(images, tta)
        labels = np.asarray(labels)
        n = len(labels)
        correct = int((probs.argmax(1) == labels).sum())
        nll = -np.log(np.clip(probs[np.arange(n), labels], 1e-12, None))
        k = len(self.classes)
        confusion = np.bincount(labels * k + probs.argmax(1), minlength=k * k).reshape(k, k)
        return {"loss": float(nll.mean()) if n else float("nan"), "accuracy": correct / max(1, n),
                "correct": correct, "n": n, "tta": self.tta,
                "calibration": calibration(calibration_sums(  # log: softmax gives probs back
                    torch.from_numpy(probs).clamp_min(1e-30).log(),
                    torch.from_numpy(labels.astype(np.int64))).tolist()),
                "confusion": confusion.tolist(),
                "per_class_accuracy": per_class_accuracy(confusion.tolist(), self.classes)}


def is_exported(path: Path) -> bool:
    return path.suffix.lower() in (".onnx", ".pt", ".ts") and path.is_file()


def load_exported(path: Path) -> Exported:
    """Load an export. ONNX is a graph of operators and runs through ONNX Runtime.

    TorchScript is a program (of TorchScript, not Python) that torch.jit.load
    runs: load only files you exported yourself or trust, as with any model.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        meta = onnx_meta(path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise CifarError("running an ONNX file needs the optional packages: "
                             "pip install 'cifarcnn[export]'") from None
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types
            raise CifarError(f"{path}: not a readable ONNX model ({e})") from None
        return Exported(path, meta, lambda x: session.run(None, {"images": x})[0],
                        cpu_batches=False)
    files = {META_KEY: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    except Exception as e:  # RuntimeError, or zipfile errors for a non-archive
        raise CifarError(f"{path}: not a TorchScript export ({e})") from None
    if not files[META_KEY]:
        raise CifarError(f"{path}: TorchScript file without cifarcnn metadata; export it "
                         "with `cifarcnn export`")
    module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return Exported(path, _meta(path, files[META_KEY]), run, cpu_batches=True)


def onnx_meta(path: Path) -> dict[str, Any]:
    """An ONNX export's cifarcnn metadata, read from the model file without running it."""
    try:
        import onnx
    except ImportError:
        raise CifarError("reading an ONNX file needs the optional packages: "
                         "pip install 'cifarcnn[export]'") from None
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
                 .metadata_props}
    except Exception as e:  # protobuf's DecodeError and friends
        raise CifarError(f"{path}: not a readable ONNX model ({e})") from None
    if META_KEY not in props:
        raise CifarError(f"{path}: ONNX file without cifarcnn metadata; export it with "
                         "`cifarcnn export`")
    return _meta(path, props[META_KEY])


def _meta(path: Path, text: str) -> dict[str, Any]:
    """An export's metadata, checked as a weights file's is (weights.check_meta)."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CifarError(f"{path}: damaged cifarcnn metadata ({e})") from None
    return check_meta(path, meta, required=("classes",))
