"""Weights on disk: safetensors with the model's name and config in its metadata.

Loading needs no pickle and runs no code: the file is tensors plus a JSON
header, and the model is rebuilt from the registry by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import CifarError
from .models import build_model

FORMAT = "cifarcnn-weights/1"
REPO_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


def save_weights(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write atomically: a temporary file, fsync, then rename over `path`."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CifarError(f"cannot write weights to {path} ({e.strerror or e})") from None


def resolve_weights_path(spec: str | os.PathLike) -> Path:
    """A path, or the name of a shipped model (`paper-cnn` -> weights/paper-cnn.safetensors)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    shipped = REPO_WEIGHTS / f"{spec}.safetensors"
    if shipped.is_file():
        return shipped
    if p.is_dir() and (p / "weights.safetensors").is_file():
        return p / "weights.safetensors"
    raise CifarError(f"weights {spec}: no such file; give a .safetensors file, a run directory, "
                     f"or a shipped model name ({', '.join(shipped_models()) or 'none shipped'})")


def shipped_models() -> list[str]:
    return sorted(p.stem for p in REPO_WEIGHTS.glob("*.safetensors"))


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
        return {k: json.loads(v) for k, v in raw.items() if k != "format"}
    except json.JSONDecodeError as e:
        raise CifarError(f"{path}: damaged metadata ({e})") from None


def load_weights(path: Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model named in the metadata and load its tensors."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    if "model" not in meta:
        raise CifarError(f"{path}: metadata names no model")
    model = build_model(meta["model"], **meta.get("model_kwargs", {}))
    try:
        state = load_file(str(path), device=device)
        model.load_state_dict(state)
    except (RuntimeError, OSError) as e:
        raise CifarError(f"{path}: tensors do not fit model {meta['model']} ({e})") from None
    return model.to(device).eval(), meta

