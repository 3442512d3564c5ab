"""Unpickling the official CIFAR-10 batches without trusting them.

A batch pickle holds a dict of bytes, lists and numpy arrays, and the archive it comes
in may be damaged or hostile. `pickle.Unpickler` with a list of allowed classes stops
code from running, but two holes stay open (both found by the archive fuzz test):

- a memo index in a LONG_BINPUT opcode makes CPython's unpickler grow its memo table to
  that size and clear it: one flipped byte asked for 21 GB and 40 s before failing;
- numpy's own `dtype.__setstate__` and `ndarray.__setstate__` take what the pickle
  says, and a mutated dtype state crashed the process (a segmentation fault).

So the opcodes are scanned first (memo indices past the pickle's own length are
refused), and numpy's classes are never handed pickled state: `numpy.dtype` and
`ndarray` come back as the stand-ins below, which check the few things a CIFAR batch
uses (an unsigned or signed integer type, a shape whose size matches the raw bytes)
and only then make the array, with `np.frombuffer`.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import pickletools
from typing import Any

import numpy as np

# The integer types a CIFAR batch or meta file stores (pixels are u1; labels are lists).
_DTYPES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})
_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def _text(v: Any) -> str:
    """Python 2 pickles read with encoding="bytes" give bytes where numpy wrote str."""
    return v.decode("latin-1") if isinstance(v, bytes) else str(v)


class _Dtype:
    """Stands in for `numpy.dtype` while unpickling: keeps the type code and byte order."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        self.spec, self.order = _text(spec), "|"

    def __setstate__(self, state: Any) -> None:
        # numpy's state: (version, byte order, subarray, names, fields, size, align, flags)
        if isinstance(state, tuple) and len(state) > 1 and _text(state[1]) in ("<", ">", "|", "="):
            self.order = _text(state[1])

    def build(self) -> np.dtype:
        if self.spec not in _DTYPES:
            raise pickle.UnpicklingError(f"array type {self.spec!r}: a CIFAR-10 batch holds "
                                         "only integer arrays")
        dt = np.dtype(self.spec)
        return dt.newbyteorder(self.order) if self.order in ("<", ">") else dt


class _Array:
    """Stands in for `numpy.ndarray` while unpickling; `array` is set by the state."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("array state is not numpy's")
        shape, dtype, fortran, raw = state[-4:]
        if (not isinstance(shape, tuple) or len(shape) > 8
                or not all(isinstance(s, int) and s >= 0 for s in shape)):
            raise pickle.UnpicklingError(f"array shape {shape!r} is not a shape")
        if not isinstance(dtype, _Dtype) or not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("array state is not numpy's")
        dt = dtype.build()
        if math.prod(shape) * dt.itemsize != len(raw):
            raise pickle.UnpicklingError(f"array of shape {shape} needs "
                                         f"{math.prod(shape) * dt.itemsize} bytes, the pickle "
                                         f"holds {len(raw)}")
        flat = np.frombuffer(bytes(raw), dtype=dt)
        self.array = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _Array:
        raise pickle.UnpicklingError("_reconstruct builds only arrays here")
    return _Array()


def _encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """How Python 3 pickles bytes (protocol 2): `_codecs.encode(text, "latin1")`."""
    if not isinstance(obj, str) or _text(encoding).lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only to turn latin1 text "
                                     "into bytes")
    return codecs.encode(obj, "latin-1")


# Every global a CIFAR-10 pickle names (numpy 1 and 2 spell the module differently).
_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): _Array, ("numpy", "dtype"): _Dtype,
            ("_codecs", "encode"): _encode}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch "
                                         "holds only arrays, lists and strings") from None


def _unwrap(obj: Any) -> Any:
    """A stand-in replaced by its array. Only a dict's values are looked into: that is
    where a batch keeps its arrays (not deeper, so no nesting can exhaust the stack)."""
    if isinstance(obj, dict):
        return {k: _array(v) for k, v in obj.items()}
    return _array(obj)


def _array(obj: Any) -> Any:
    if isinstance(obj, _Array):
        if obj.array is None:
            raise pickle.UnpicklingError("an array without its data")
        return obj.array
    return obj


def loads(data: bytes) -> Any:
    """Unpickle a CIFAR batch or meta file (as Python 2 wrote it, or 3): dicts, lists,
    bytes, numbers and integer arrays; anything else raises pickle.UnpicklingError (or
    another of `datasets.PICKLE_ERRORS`)."""
    for op, arg, _ in pickletools.genops(data):
        if op.name in _MEMO_OPS and isinstance(arg, int) and not 0 <= arg <= len(data):
            raise pickle.UnpicklingError(f"memo index {arg} in a {len(data)}-byte pickle")
    return _unwrap(_Unpickler(io.BytesIO(data), encoding="bytes").load())
