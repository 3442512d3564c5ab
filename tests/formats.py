"""Builders for tiny data sets in the official CIFAR-10 formats and as image folders."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cifarcnn.datasets import CLASSES


def _py_batch(x: np.ndarray, y: np.ndarray, label: str) -> bytes:
    """One batch exactly as the official pickles hold it: CHW rows, bytes keys."""
    d = {b"batch_label": label.encode(), b"labels": [int(v) for v in y],
         b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072).copy(),
         b"filenames": [f"img_{i}.png".encode() for i in range(len(x))]}
    return pickle.dumps(d, protocol=2)


def py2_pickle(obj) -> bytes:
    """`obj` as Python 2's cPickle (protocol 2) wrote the official batches: byte strings
    as BINSTRING, arrays through numpy 1's `numpy.core.multiarray._reconstruct`, with
    their bytes as one string. Dicts, lists, tuples, bytes, ints, bools, None and uint8
    arrays only."""
    out = bytearray(b"\x80\x02")

    def put(v) -> None:
        nonlocal out
        if isinstance(v, bytes):
            out += (b"U" + bytes([len(v)]) if len(v) < 256 else
                    b"T" + struct.pack("<I", len(v))) + v
        elif v is None or isinstance(v, bool):
            out += {None: b"N", True: b"\x88", False: b"\x89"}[v]
        elif isinstance(v, int):
            out += b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)
        elif isinstance(v, (list, tuple)):
            out += b"](" if isinstance(v, list) else b"("
            for e in v:
                put(e)
            out += b"e" if isinstance(v, list) else b"t"
        elif isinstance(v, dict):
            out += b"}("
            for k, e in v.items():
                put(k)
                put(e)
            out += b"u"
        elif isinstance(v, np.ndarray) and v.dtype == np.uint8:
            out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
            put((0,))
            out += b"U\x01b\x87R("  # _reconstruct(ndarray, (0,), "b"), then its state
            put(1)
            put(tuple(v.shape))
            out += b"cnumpy\ndtype\n"
            put((b"u1", 0, 1))
            out += b"R"
            put((3, b"|", None, None, None, -1, -1, 0))
            out += b"b"  # the dtype's state
            put(False)
            put(np.ascontiguousarray(v).tobytes())
            out += b"tb"  # the array's state
        else:
            raise TypeError(type(v))

    put(obj)
    return bytes(out + b".")


def _bin_batch(x: np.ndarray, y: np.ndarray) -> bytes:
    rec = np.concatenate([y.astype(np.uint8)[:, None],
                          x.transpose(0, 3, 1, 2).reshape(len(x), 3072)], axis=1)
    return rec.tobytes()


def make_split(n_per_batch: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = [(rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8),
                rng.integers(0, 10, n_per_batch).astype(np.int64)) for _ in range(6)]
    return batches[:5], batches[5]


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def python_archive(path: Path, train, test, python2: bool = False) -> Path:
    """The python-pickle archive; `python2`: its pickles as Python 2 wrote the official ones."""
    files = {f"cifar-10-batches-py/data_batch_{i + 1}": _py_batch(x, y, f"batch {i + 1}")
             for i, (x, y) in enumerate(train)}
    files["cifar-10-batches-py/test_batch"] = _py_batch(*test, "test")
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps(
        {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, protocol=2)
    if python2:
        files = {k: py2_pickle(pickle.loads(v, encoding="bytes")) for k, v in files.items()}
    return _tar(path, files)


def binary_archive(path: Path, train, test) -> Path:
    files = {f"cifar-10-batches-bin/data_batch_{i + 1}.bin": _bin_batch(x, y)
             for i, (x, y) in enumerate(train)}
    files["cifar-10-batches-bin/test_batch.bin"] = _bin_batch(*test)
    files["cifar-10-batches-bin/batches.meta.txt"] = "\n".join(CLASSES).encode() + b"\n"
    return _tar(path, files)


FINE = [f"fine_{i:02d}" for i in range(100)]  # CIFAR-100's 100 classes, 20 superclasses
COARSE = [f"coarse_{i:02d}" for i in range(20)]


def make_split_100(n_train: int = 60, n_test: int = 20, seed: int = 0):
    """CIFAR-100-like splits: images, fine labels (0..99) and their coarse ones."""
    rng = np.random.default_rng(seed)

    def split(n):
        fine = rng.integers(0, 100, n).astype(np.int64)
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), fine, fine // 5

    return split(n_train), split(n_test)


def python100_archive(path: Path, train, test) -> Path:
    """CIFAR-100's python archive: one pickle per split with fine and coarse labels."""
    def batch(x, fine, coarse, label):
        return pickle.dumps({b"filenames": [f"{i}.png".encode() for i in range(len(x))],
                             b"batch_label": label.encode(),
                             b"fine_labels": [int(v) for v in fine],
                             b"coarse_labels": [int(v) for v in coarse],
                             b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072).copy()},
                            protocol=2)

    meta = {b"fine_label_names": [c.encode() for c in FINE],
            b"coarse_label_names": [c.encode() for c in COARSE]}
    return _tar(path, {"cifar-100-python/train": batch(*train, "training batch 1 of 1"),
                       "cifar-100-python/test": batch(*test, "testing batch 1 of 1"),
                       "cifar-100-python/meta": pickle.dumps(meta, protocol=2)})


def binary100_archive(path: Path, train, test) -> Path:
    """CIFAR-100's binary archive: records of coarse label, fine label, 3,072 pixels."""
    def records(x, fine, coarse):
        return np.concatenate([coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None],
                               x.transpose(0, 3, 1, 2).reshape(len(x), 3072)], axis=1).tobytes()

    return _tar(path, {"cifar-100-binary/train.bin": records(*train),
                       "cifar-100-binary/test.bin": records(*test),
                       "cifar-100-binary/fine_label_names.txt": "\n".join(FINE).encode(),
                       "cifar-100-binary/coarse_label_names.txt": "\n".join(COARSE).encode()})


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, per_class: int = 2, classes=("cat", "dog", "frog"),
                 seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                (d / f"{i:04d}.png").write_bytes(png_bytes(img))
    return root
