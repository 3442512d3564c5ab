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
    TOP_K,
    TTA_VIEWS,
    Classifier,
    as_batch,
    calibration,
    calibration_sums,
    eval_batch,
    per_class_accuracy,
    read_images,
    top_k_correct,
)
from .weights import SHIPPED, check_meta

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
META_KEY = "cifarcnn.json"  # TorchScript extra file / ONNX metadata key
TOLERANCE = 1e-4  # max |p_export - p_eager| on probabilities, both fp32
# An int8 graph cannot meet TOLERANCE; it must keep its accuracy instead: at most this
# much below the fp32 graph's on the checked test images, or it is not written
INT8_MAX_DROP = 0.01
WEIGHTED = ("Conv", "MatMul", "Gemm")  # the operators int8 quantization replaces


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


def export_path(weights: Path, fmt: str, out: Path | str | None, int8: bool = False) -> Path:
    """Where an export goes: `out`, checked for the suffix predict and evaluate recognise,
    or by default beside the weights (`-int8` added for an int8 graph, so it never
    replaces the fp32 one). A shipped model's export goes to the current folder instead:
    the shipped folder is the package's own, often read-only in an installed wheel."""
    if fmt not in FORMATS:
        raise CifarError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if out:
        out = Path(out)
    else:
        weights = Path(weights)
        folder = (Path.cwd() if weights.resolve().parent == SHIPPED.resolve()
                  else weights.parent)
        out = folder / f"{weights.stem}{'-int8' if int8 else ''}{FORMATS[fmt]}"
    allowed = (".pt", ".ts") if fmt == "torchscript" else (".onnx",)
    if out.suffix.lower() not in allowed:
        raise CifarError(f"--out {out}: a {fmt} file must end in {' or '.join(allowed)} "
                         "(that is how predict and evaluate recognise it)")
    return out


def export(clf: Classifier, fmt: str, out: Path | None = None,
           check_images: np.ndarray | None = None, check_labels: np.ndarray | None = None,
           int8_calibration: np.ndarray | None = None) -> dict[str, Any]:
    """Write `clf` as `fmt`, reload it, compare with eager; returns what was checked.

    `int8_calibration` (ONNX only): quantize the graph to int8 (`quantize_onnx`),
    calibrated on these images. Such a graph is checked by its accuracy on
    `check_images` against `check_labels`, not by the fp32 tolerance.
    """
    if fmt not in FORMATS:
        raise CifarError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if int8_calibration is not None:
        if fmt != "onnx":
            raise CifarError(f"--int8: an ONNX graph only (ONNX Runtime runs it); give "
                             f"--format onnx, not {fmt}")
        if len(int8_calibration) == 0:
            raise CifarError("--calibration-images 0: calibrate on at least 1 image")
        if check_images is not None and (check_labels is None
                                         or len(check_labels) != len(check_images)):
            raise CifarError("--int8: its check needs the test images' labels")
    out = export_path(clf.path, fmt, out, int8=int8_calibration is not None)
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
                if int8_calibration is not None:
                    quantize_onnx(tmp, int8_calibration, meta)
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
            if int8_calibration is not None:
                labels = np.asarray(check_labels)
                report["accuracy_fp32"] = float((expected.argmax(1) == labels).mean())
                report["accuracy"] = float((got.argmax(1) == labels).mean())
                report["max_drop"] = INT8_MAX_DROP
                if report["accuracy"] < report["accuracy_fp32"] - INT8_MAX_DROP:
                    raise CifarError(
                        f"{out}: the int8 graph's accuracy, {report['accuracy']:.2%} on "
                        f"{len(labels):,} test images, is more than {INT8_MAX_DROP:.0%} "
                        f"below the fp32 graph's {report['accuracy_fp32']:.2%}; not written "
                        "(export without --int8)")
            elif not report["max_abs_diff"] <= TOLERANCE:  # NaN differences fail too
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


def quantize_onnx(path: Path, calibration: np.ndarray, meta: dict[str, Any],
                  batch: int = 100) -> None:
    """Make the ONNX graph at `path` int8, in place: ONNX Runtime's static quantization.

    Weights per output channel in int8, activations in uint8 with ranges calibrated on
    `calibration` (uint8 NHWC images), as QuantizeLinear/DequantizeLinear pairs that
    ONNX Runtime fuses into int8 kernels. The layers that read the pixels stay fp32:
    on an AVX2 CPU quantizing them cost 13 points of `paper-cnn`'s accuracy (the fast
    net's whitening: 28 points), on an AVX-512 VNNI one nothing, and a file runs on any
    CPU (README, "Execution modes and exports"); the rest costs ~0. `meta`, the
    export's metadata, gains an "int8" entry (the calibration's size, the fp32 layers)
    and is written into the quantized graph.
    """
    import onnx

    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise CifarError("--int8 needs ONNX Runtime's quantizer: pip install "
                         "'cifarcnn[export]'") from None

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.rest = iter(range(0, len(calibration), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.rest, None)
            return None if i is None else {"images": calibration[i:i + batch]}

    pre = path.with_name(path.stem + ".pre" + path.suffix)
    ort_logger = logging.getLogger()  # the quantizer advises through the root logger
    level = ort_logger.level
    ort_logger.setLevel(logging.ERROR)
    try:
        # shape inference and graph clean-up first, as ONNX Runtime recommends (its
        # symbolic shape pass cannot follow the TTA views' index vectors: skipped)
        quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
        proto = onnx.load(str(pre))
        first = pixel_layers(proto.graph)
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(pre), str(path), Batches(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=list(WEIGHTED),
                            nodes_to_exclude=first)
    finally:
        ort_logger.setLevel(level)
        pre.unlink(missing_ok=True)
    meta["int8"] = {"calibration_images": len(calibration), "fp32_layers": first}
    quantized = onnx.load(str(path))
    shared_initializers(quantized.graph)
    props = {p.key: p.value for p in proto.metadata_props} | {META_KEY: json.dumps(meta)}
    del quantized.metadata_props[:]
    for key, value in props.items():
        entry = quantized.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(quantized, str(path))


def shared_initializers(graph: Any) -> None:
    """Point every node at one copy of each distinct constant, dropping the others.

    The TTA views run the same model, so the fp32 graph holds its weights once; the
    quantizer writes each node's int8 weights apart, one copy per view (flip-shift:
    4.7 of 6.3 MB). Equal contents, type and shape make equal constants.
    """
    from onnx import numpy_helper

    canonical: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for t in graph.initializer:
        array = numpy_helper.to_array(t)
        key = (t.data_type, tuple(t.dims), array.tobytes())
        if key in canonical:
            rename[t.name] = canonical[key]
        else:
            canonical[key] = t.name
            keep.append(t)
    if not rename:
        return
    del graph.initializer[:]
    graph.initializer.extend(keep)
    listed = [i for i in graph.input if i.name not in rename]  # older IRs list constants
    if len(listed) != len(graph.input):
        del graph.input[:]
        graph.input.extend(listed)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def pixel_layers(graph: Any) -> list[str]:
    """The weighted nodes (conv, matrix product) with no weighted node before them: the
    first layer of each TTA view, which reads the normalised pixels."""
    after: set[str] = set()  # tensors computed from some weighted node's output
    first = []
    for node in graph.node:  # ONNX keeps nodes in topological order
        downstream = any(name in after for name in node.input)
        if node.op_type in WEIGHTED and not downstream:
            first.append(node.name)
        if downstream or node.op_type in WEIGHTED:
            after.update(node.output)
    return first


class Exported:
    """A TorchScript or ONNX export, used like a Classifier for predict and evaluate."""

    def __init__(self, path: Path, meta: dict[str, Any], run, cpu_batches: bool) -> None:
        """`cpu_batches`: run in a CPU's inference batches (TorchScript: 1.9x faster at 128
        than at 1,000, benchmarks/eval_batch.py; an int8 ONNX graph: 1.05x on an AVX2 CPU,
        1.30x on an AVX-512 VNNI one), else in batches of 1,000 (ONNX Runtime's fp32 graph,
        which plans its own memory, ran 128 no faster, 0.94x on the VNNI CPU)."""
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
                 tta: str | bool | None = None,
                 keep_probabilities: bool = False) -> dict[str, Any]:
        probs = self.predict(images, tta)
        labels = np.asarray(labels)
        n = len(labels)
        correct = int((probs.argmax(1) == labels).sum())
        nll = -np.log(np.clip(probs[np.arange(n), labels], 1e-12, None))
        k = len(self.classes)
        confusion = np.bincount(labels * k + probs.argmax(1), minlength=k * k).reshape(k, k)
        top = int(top_k_correct(torch.from_numpy(probs),
                                torch.from_numpy(labels.astype(np.int64))))
        return {"loss": float(nll.mean()) if n else float("nan"), "accuracy": correct / max(1, n),
                "correct": correct, "n": n, "tta": self.tta,
                f"top{TOP_K}_accuracy": top / max(1, n),
                "calibration": calibration(calibration_sums(  # log: softmax gives probs back
                    torch.from_numpy(probs).clamp_min(1e-30).log(),
                    torch.from_numpy(labels.astype(np.int64))).tolist()),
                "confusion": confusion.tolist(),
                "per_class_accuracy": per_class_accuracy(confusion.tolist(), self.classes),
                **({"probabilities": probs} if keep_probabilities else {})}


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
                        cpu_batches="int8" in meta)
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
