"""Checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint holds the model, optimizer, LR schedule and grad-scaler state,
every random generator the loop draws from (torch CPU and CUDA, numpy,
Python), the position in the epoch plan (epoch, step: the plan itself is a
pure function of seed and epoch, see augment.py), the half-summed metrics of
the current epoch, the history so far and the config.

Writing is atomic: a temporary file in the same folder, flushed and fsynced,
then renamed over the old one and the folder fsynced, so a kill at any
instant leaves the old or the new checkpoint, never a torn one. Reading uses
`torch.load(weights_only=True)`, which unpickles tensors and plain
containers only: a file crafted to run code is refused, never executed.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import signal
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CifarError

LAST = "ckpt-last.pt"
BEST = "ckpt-best.pt"
FORMAT = "cifarcnn-checkpoint/1"


class Interrupted(CifarError):
    """SIGINT/SIGTERM arrived; a checkpoint was written. Exit code 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def rng_state() -> dict[str, Any]:
    """Every global generator, in types `weights_only` loading accepts (no numpy arrays)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"],
                         "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """random.setstate wants tuples all the way down; a round trip may give lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def write_atomic(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` so that `path` is always either old or new, never partial.

    On failure (disk full, permission denied) the old file is untouched and
    the temporary one removed; the error names the file and the cause.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        keep = " (the previous one is intact)" if path.exists() else ""
        raise CifarError(f"cannot write checkpoint {path}: {e.strerror or e}{keep}; free space "
                         "or fix the folder's permissions, then --resume") from None


def save(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    write_atomic(path, buf.getvalue())


def load(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Read a checkpoint without executing anything in it."""
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols; we refuse
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CifarError(f"{path}: no such checkpoint") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CifarError(f"{path}: refused: not a safe cifarcnn checkpoint (it holds more than "
                         f"tensors and plain data, or is damaged: {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CifarError(f"{path}: not a cifarcnn checkpoint")
    return state


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the step loop checks after each step.

    The loop then writes a checkpoint and stops cleanly. A second signal while
    the first is being handled aborts at once (the last checkpoint stays).
    Only the main thread may install handlers; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread
            self._old.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
