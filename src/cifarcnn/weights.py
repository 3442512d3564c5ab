"""Weights on disk: safetensors with the model's name and config in its metadata.

Loading needs no pickle and runs no code: the file is tensors plus a JSON
header, and the model is rebuilt from the registry by name.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import LAST
from .config import TTA_MODES
from .errors import CifarError
from .models import build_model

FORMAT = "cifarcnn-weights/1"
# The shipped weights: the repository's weights/ folder in a source checkout (and an
# editable install); in an installed wheel, the same files as the package cifarcnn.shipped
# (pyproject.toml maps the folder there), so `load("fast")` works after `pip install`.
SHIPPED = (Path(__file__).resolve().parent / "shipped"
           if (Path(__file__).resolve().parent / "shipped").is_dir()
           else Path(__file__).resolve().parents[2] / "weights")


def save_weights(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write atomically: a temporary file, fsync, then rename over `path`."""
    save_state(path, {k: v.detach().to("cpu").contiguous()
                      for k, v in model.state_dict().items()}, meta)


def rewrite_meta(src: Path, dst: Path, meta: dict[str, Any]) -> None:
    """`src`'s tensors, unchanged, written to `dst` (which may be `src`) with `meta`."""
    from safetensors.torch import load_file

    save_state(dst, load_file(str(src)), meta)


def save_state(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    header = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # safetensors reports its own I/O failures
        tmp.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) else str(e).split(" at path ")[0]
        raise CifarError(f"cannot write weights to {path} ({why or e})") from None


def resolve_weights_path(spec: str | os.PathLike) -> Path:
    """A path, or the name of a shipped model (`paper-cnn` -> weights/paper-cnn.safetensors)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    shipped = SHIPPED / f"{spec}.safetensors"
    if shipped.is_file():
        return shipped
    if p.is_dir() and (p / "weights.safetensors").is_file():
        return p / "weights.safetensors"
    if p.is_dir() and (p / LAST).is_file():
        raise CifarError(f"weights {spec}: an unfinished run (no weights.safetensors yet); "
                         f"finish it with: cifarcnn train --resume {spec}")
    if p.is_dir():
        raise CifarError(f"weights {spec}: a folder without weights.safetensors; give a "
                         ".safetensors file, a run directory, or a shipped model name "
                         f"({', '.join(shipped_models()) or 'none shipped'})")
    raise CifarError(f"weights {spec}: no such file; give a .safetensors file, a run directory, "
                     f"or a shipped model name ({', '.join(shipped_models()) or 'none shipped'})")


def shipped_models() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.safetensors"))


def read_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except Exception as e:
        raise CifarError(f"{path}: not a safetensors weights file ({e})") from None
    if raw.get("format") != FORMAT:
        raise CifarError(f"{path}: safetensors file without cifarcnn metadata; "
                         "it was not written by cifarcnn")
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    except json.JSONDecodeError as e:
        raise CifarError(f"{path}: damaged metadata ({e})") from None
    return check_meta(path, meta, required=("model",))


def _numbers(v: Any, positive: bool = False) -> bool:
    return (isinstance(v, list) and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    and (x > 0 or not positive) for x in v))


def _accuracy(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)


# The metadata fields that loading, inference and export read, and what each must be.
FIELDS: dict[str, tuple[Any, str]] = {
    "model": (lambda v: isinstance(v, str), "a model name"),
    "model_kwargs": (lambda v: isinstance(v, dict), "a JSON object of model arguments"),
    "classes": (lambda v: isinstance(v, list) and 0 < len(v) <= 1 << 16
                and all(isinstance(c, str) for c in v) and len(set(v)) == len(v),
                "a list of distinct class names"),
    "precision": (lambda v: v in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16"),
    "tta": (lambda v: v in TTA_MODES, "one of " + ", ".join(TTA_MODES)),
    "eval_batch_size": (lambda v: type(v) is int and 0 < v <= 1 << 20,
                        "a whole number of images from 1 to 1,048,576"),
    "channels_last": (lambda v: isinstance(v, bool), "true or false"),
    "mean": (_numbers, "three numbers"),
    "std": (lambda v: _numbers(v, positive=True), "three positive numbers"),
    "temperature": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and 1e-3 <= v <= 1e3, "a number from 0.001 to 1000"),
    **{k: (_accuracy, "an accuracy from 0 to 1")
       for k in ("val_accuracy", "val_accuracy_no_tta", "test_accuracy")},
}


def check_meta(path: Path, meta: Any, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """`meta` with every field in FIELDS checked, so that a damaged or hand-edited file
    fails here with one line naming the field, not as a TypeError deep inside inference
    (a fuzz of 400 edits of these fields found 22 such ways). Other fields are informational."""
    if not isinstance(meta, dict):
        raise CifarError(f"{path}: damaged metadata (not a JSON object)")
    for key in required:
        if key not in meta:
            raise CifarError(f"{path}: metadata has no {key!r} field; the file is damaged")
    for key, (ok, want) in FIELDS.items():
        if key in meta and not ok(meta[key]):
            raise CifarError(f"{path}: metadata field {key!r} is {json.dumps(meta[key])[:80]}, "
                             f"not {want}; the file is damaged or was edited by hand")
    return meta


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a weights file, read from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)


def shape_mismatches(path: Path, meta: dict[str, Any], kwargs: dict[str, Any]) -> list[Any]:
    """The first differences between the file's tensors and model meta["model"] built with
    `kwargs` (and the file's class count), built on the meta device: no memory used."""
    with torch.device("meta"):
        skeleton = build_model(meta["model"], **{**kwargs, "num_classes": len(
            meta.get("classes", [])) or kwargs.get("num_classes", 10)})
    have = tensor_shapes(path)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    return sorted(set(have.items()) ^ set(want.items()))[:3]


def load_weights(path: Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model named in the metadata and load its tensors.

    The model is first built on the meta device (shapes, no memory) and its tensors'
    shapes compared with the file's, so arguments in the metadata can never make it
    allocate more than the file holds (a hand-edited width of a million would ask for
    terabytes)."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    kwargs = meta.get("model_kwargs", {})
    try:
        with torch.device("meta"):
            skeleton = build_model(meta["model"], **kwargs)
    except CifarError as e:  # arguments out of range: say which file holds them
        raise CifarError(f"{path}: {e}") from None
    have = tensor_shapes(path)
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))[:3]
        raise CifarError(f"{path}: tensors do not fit model {meta['model']} with arguments "
                         f"{kwargs} (first differences, name and shape: {diff})")
    model = build_model(meta["model"], **kwargs)
    try:
        state = load_file(str(path), device=device)
        model.load_state_dict(state)
    except (RuntimeError, OSError) as e:
        raise CifarError(f"{path}: tensors do not fit model {meta['model']} ({e})") from None
    # NaN or infinite weights give NaN probabilities that predict would print and export's
    # equality check (NaN compares false) would let through: one line at load instead
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CifarError(f"{path}: tensor {name!r} holds NaN or infinite values (weights "
                             "that diverged in training, or a damaged file); use other weights")
    return model.to(device).eval(), meta


def init_from_weights(model: nn.Module, path: str | os.PathLike,
                      classes: list[str]) -> tuple[int, int]:
    """Fine-tuning's start: copy saved weights into a freshly built `model`.

    With the weights' own classes, every tensor is copied. For other classes (another
    dataset, or the same names in another order) the tensors whose shape depends on the
    class count, the head, keep their fresh initialisation: they are found by building
    the model for one more class on the meta device and seeing which shapes change, so
    this needs no knowledge of any model's layer names. Returns (tensors copied, left new).
    """
    p = resolve_weights_path(path)
    saved, meta = load_weights(p)
    mine = model.state_dict()
    same_classes = list(meta.get("classes", [])) == list(classes)
    head: set[str] = set()
    if not same_classes:
        kwargs = {**meta.get("model_kwargs", {}), "num_classes": len(classes) + 1}
        with torch.device("meta"):
            wider = build_model(meta["model"], **kwargs).state_dict()
        head = {k for k, v in mine.items() if tuple(wider[k].shape) != tuple(v.shape)}
    theirs = saved.state_dict()
    bad = sorted(k for k in mine if k not in head
                 and (k not in theirs or theirs[k].shape != mine[k].shape))
    if bad:
        raise CifarError(f"--init-from {path}: its tensors do not fit this model (first: "
                         f"{bad[0]}); fine-tune with the weights' own model arguments")
    with torch.no_grad():
        for k, v in mine.items():
            if k not in head:
                v.copy_(theirs[k])
    return len(mine) - len(head), len(head)
