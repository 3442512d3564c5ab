"""Reading the JSON files of run and experiment folders, which may be damaged or edited,
and checking where long commands will write theirs.

A folder may be half-copied, edited by hand or hit by a bad disk; whatever reads it
(resume, results, report, the time-to-accuracy benchmark) gets its files through here,
so that each damage is one line naming the file and the field, not a KeyError or
TypeError from deep inside.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CifarError

# The numbers a run's summary.json holds that results and reports read.
SUMMARY_NUMBERS = ("epochs", "train_accuracy", "val_accuracy", "best_val_accuracy",
                   "train_seconds")
# What tables and charts read of each epoch's line of metrics.jsonl.
ROW_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_json(path: Path, numbers: tuple[str, ...] = (), required: tuple[str, ...] = ()
              ) -> dict[str, Any]:
    """The file's JSON object. `numbers`: fields that must be numbers where present;
    `required`: fields that must be present."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CifarError(f"{path}: unreadable ({e}); the folder is damaged") from None
    if not isinstance(obj, dict):
        raise CifarError(f"{path}: not a JSON object; the folder is damaged")
    for k in numbers:
        if k in obj and not is_number(obj[k]):
            raise CifarError(f"{path}: {k!r} is {json.dumps(obj[k])[:60]}, not a number; "
                             "the folder is damaged")
    for k in required:
        if k not in obj:
            raise CifarError(f"{path}: no {k!r} field; the folder is damaged")
    return obj


def read_summary(path: Path) -> dict[str, Any]:
    """A finished run's summary.json: the numbers results and reports read, checked."""
    s = read_json(path, numbers=SUMMARY_NUMBERS, required=SUMMARY_NUMBERS)
    if not isinstance(s.get("model", ""), str):
        raise CifarError(f"{path}: 'model' is not a model name; the folder is damaged")
    return s


def read_history(run: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, one dict per finished epoch, each line checked for the
    numbers tables and charts read."""
    path = run / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CifarError(f"{path}: unreadable ({e})") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CifarError(f"{path}, line {i}: not JSON ({e}); the run folder is "
                             "damaged") from None
        missing = [k for k in ROW_KEYS if not (isinstance(row, dict) and is_number(row.get(k)))]
        if missing:
            raise CifarError(f"{path}, line {i}: {missing[0]!r} is missing or not a number; "
                             "the run folder is damaged")
        rows.append(row)
    if not rows:
        raise CifarError(f"{path}: no epoch finished yet; report a run after its first epoch")
    return rows


# ------------------------------------------------------------------ where results go
# Benchmarks write their results only after minutes to hours of training: a path
# that cannot take them must stop the command before the training, not after it.

def check_output_folder(flag: str, path: Path) -> None:
    """`path` is, or can be made, a writable folder."""
    if path.exists() and not path.is_dir():
        raise CifarError(f"{flag} {path}: exists and is not a folder; choose another path")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise CifarError(f"{flag} {path}: cannot create or write it ({ancestor} is not a "
                         "writable folder); choose another path")


def check_output_file(flag: str, path: Path) -> None:
    """`path` can be written: its folder exists and is writable, and it is no folder."""
    if path.is_dir():
        raise CifarError(f"{flag} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise CifarError(f"{flag} {path}: the folder {path.parent} does not exist; create it "
                         "or choose another path")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CifarError(f"{flag} {path}: the folder {path.parent} is not writable; choose "
                         "another path")


def write_text_atomic(flag: str, path: Path, text: str) -> None:
    """Write through a temporary file, so a failed write leaves any old file whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CifarError(f"{flag} {path}: cannot write ({e.strerror or e})") from None
