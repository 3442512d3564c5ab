"""What a weights file or export is, read from its metadata: `cifarcnn info`.

Someone handed a `.safetensors`, `.onnx` or `.pt` file wants to know what
it holds before they deploy it: the model, its classes, the TTA that
inference will apply, the accuracy recorded when it was trained, and a
checksum to compare copies by. None of this runs the file: safetensors and
ONNX metadata are parsed, and a TorchScript export's metadata is read from
its zip archive without loading the program.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

from .errors import CifarError
from .weights import resolve_weights_path

# Fields of a run's summary worth showing beside the weights (the rest are in the file).
SUMMARY_FIELDS = ("train_seconds", "device", "device_name", "cpu", "threads", "processes",
                  "torch", "command", "calibrate_command")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_meta(path: Path) -> dict[str, Any]:
    """An export's cifarcnn metadata, without running it."""
    from .export import META_KEY, _meta, onnx_meta

    if path.suffix.lower() == ".onnx":
        return onnx_meta(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{META_KEY}")]
            text = z.read(names[0]).decode() if names else None
    except (zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise CifarError(f"{path}: not a TorchScript export ({e})") from None
    if text is None:
        raise CifarError(f"{path}: TorchScript file without cifarcnn metadata; export it "
                         "with `cifarcnn export`")
    return _meta(path, text)


def summary_beside(path: Path) -> dict[str, Any] | None:
    """The training summary kept beside weights: a run's summary.json, or the
    `<name>.json` of a shipped model (weights/README.md)."""
    found = path.parent / "summary.json" if path.name == "weights.safetensors" \
        else path.with_suffix(".json")
    try:
        summary = json.loads(found.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


def describe(spec: str) -> dict[str, Any]:
    """Everything `info` shows, as one JSON-ready dict."""
    from .export import is_exported

    path = resolve_weights_path(spec)
    out: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size}
    if is_exported(path):
        out["format"] = "onnx" if path.suffix.lower() == ".onnx" else "torchscript"
        meta = export_meta(path)
    else:
        from .models import count_parameters
        from .weights import load_weights

        out["format"] = "safetensors"
        model, meta = load_weights(path)  # also proves the tensors fit the model
        out["parameters"] = count_parameters(model)
    out["sha256"] = sha256(path)
    out.update({k: meta[k] for k in ("model", "model_kwargs", "classes", "tta", "precision",
                                     "epochs", "seed", "val_accuracy", "val_accuracy_no_tta",
                                     "test_accuracy", "init_from", "recipe_changes",
                                     "temperature", "temperature_fit", "input", "output",
                                     "int8")
                if k in meta})
    summary = summary_beside(path) if out["format"] == "safetensors" else None
    if summary is not None:
        out["training"] = {k: summary[k] for k in SUMMARY_FIELDS if summary.get(k) is not None}
    return out


def _percent(v: Any) -> str:
    return f"{v:.2%}" if isinstance(v, (int, float)) else "not recorded"


def format_info(d: dict[str, Any]) -> str:
    """`describe`'s dict as aligned lines for a terminal."""
    rows = [("file", f"{d['format']}, {d['bytes'] / 1e6:.1f} MB"), ("sha256", d["sha256"])]
    model = d.get("model", "not recorded")
    if "parameters" in d:
        model += f", {d['parameters']:,} parameters"
    if d.get("model_kwargs"):
        model += f", arguments {json.dumps(d['model_kwargs'])}"
    rows.append(("model", model))
    classes = d.get("classes", [])
    rows.append(("classes", f"{len(classes)}: {' '.join(classes)}"))
    tta = d.get("tta", "none")
    if d["format"] == "safetensors":
        rows.append(("TTA", f"{tta} (applied by default; --no-tta or tta=False for one view)"
                     if tta != "none" else "none"))
    else:
        rows.append(("TTA", f"{tta} (inside the graph)"))
    if "epochs" in d or "seed" in d or "precision" in d:
        rows.append(("trained", ", ".join(
            s for s in (f"{d['epochs']} epochs" if "epochs" in d else "",
                        f"seed {d['seed']}" if "seed" in d else "",
                        f"in {d['precision']}" if "precision" in d else "") if s)))
    if "temperature" in d:
        fit = d.get("temperature_fit") or {}
        how = (f" (fitted on {fit['images']:,} {fit['split']} images)"
               if isinstance(fit, dict) and type(fit.get("images")) is int
               and isinstance(fit.get("split"), str) else "")
        rows.append(("calibrated", f"temperature {d['temperature']:.4f}{how}"))
    if d.get("init_from"):
        rows.append(("fine-tuned", f"from {d['init_from']}"))
    changes = d.get("recipe_changes")
    if isinstance(changes, dict):  # recorded since 2026-11-29; older weights say nothing
        name = d.get("model", "the model")
        rows.append(("recipe", f"{name}'s own" if not changes else f"{name}'s, changed: "
                     + ", ".join(f"{k} {json.dumps(v)}" for k, v in changes.items())))
    accuracy = f"{_percent(d.get('val_accuracy'))} with its TTA"
    if tta == "none":
        accuracy = _percent(d.get("val_accuracy"))
    elif "val_accuracy_no_tta" in d:
        accuracy += f", {_percent(d['val_accuracy_no_tta'])} single view"
    rows.append(("accuracy", accuracy + " (validation at training time)"))
    if d.get("test_accuracy") is not None:
        rows.append(("test", f"{_percent(d['test_accuracy'])} (held-out test images)"))
    t = d.get("training", {})
    if t:
        where = t.get("device_name") or t.get("cpu") or t.get("device", "")
        parts = []
        if isinstance(t.get("train_seconds"), (int, float)):
            parts.append(f"{t['train_seconds']:.1f} s")
        if where:
            parts.append(f"on {where}")
        if t.get("threads"):
            parts.append(f"{t['threads']} threads")
        if t.get("processes", 1) != 1:
            parts.append(f"{t['processes']} processes")
        if t.get("torch"):
            parts.append(f"torch {t['torch']}")
        rows.append(("training", ", ".join(parts)))
        if t.get("command"):
            rows.append(("command", str(t["command"])))
        if t.get("calibrate_command") and "temperature" in d:
            rows.append(("then", str(t["calibrate_command"])))
    if "input" in d:
        rows.append(("input", f"{d['input']} -> {d.get('output', '')}"))
    q = d.get("int8")
    if isinstance(q, dict):
        n, kept = q.get("calibration_images"), q.get("fp32_layers")
        rows.append(("int8", "weights and activations"
                     + (f", calibrated on {n:,} training images" if type(n) is int else "")
                     + (f"; the first layer kept in fp32 ({len(kept)} copies: one per TTA view)"
                        if isinstance(kept, list) else "")))
    width = max(len(k) for k, _ in rows)
    return "\n".join([d["path"]] + [f"  {k:<{width}}  {v}" for k, v in rows])
