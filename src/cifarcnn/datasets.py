"""CIFAR-10 from any of its usual forms, decoded once into a uint8 NHWC cache.

Forms read: the official python pickles (`cifar-10-python.tar.gz` or
`cifar-10-batches-py/`), the official binary records (`cifar-10-binary.tar.gz`
or `cifar-10-batches-bin/`), CIFAR-100's two official forms likewise
(`cifar-100-python`, `cifar-100-binary`: its 100 fine classes), and image
folders `<root>/{train,test}/<class>/*` (png/jpg/jpeg) as a folder or a
.tar.gz/.tar/.zip of one. Class order is the sorted folder names, files are
taken in sorted order within a class.

Decoding 60,000 JPEGs takes seconds; the result is cached as a safetensors
file keyed by the source's path and fingerprint (size and mtime), so the next
load is a memory map and a changed source is decoded again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import archives, pickles
from .errors import CifarError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean and std of the training split, in [0, 1]
STD = (0.2470, 0.2435, 0.2616)

OFFICIAL = {
    "python": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
               "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "binary": ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
               "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin"),
    # CIFAR-100: fetched where --data names one of its archives or folders
    "python-100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                   "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
    "binary-100": ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                   "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary"),
}
PY_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
BIN_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
PY_100 = ("train", "test", "meta")  # CIFAR-100's files: one batch per split
BIN_100 = ("train.bin", "test.bin", "fine_label_names.txt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_PIXELS = 8192 * 8192  # larger images are refused as likely decompression bombs
# 2: 16-bit grey decoded to its tones, not clipped (_eight_bit); photos turned upright
CACHE_VERSION = "2"
ORIENTATION = 0x0112  # the EXIF tag cameras set instead of rotating the pixels
# PIL's EXIF parser warns of damaged blocks in photos that decode fine without them; set
# once here, as catch_warnings is not thread-safe and images decode on a thread per core
warnings.filterwarnings("ignore", message="(Corrupt EXIF data|Tag data larger than file)",
                        category=UserWarning, module=r"PIL\.TiffImagePlugin")


@dataclass
class CifarData:
    """Both splits as uint8 NHWC images (N, 32, 32, 3) and int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    source: str
    skipped: int = 0


def home_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("CIFARCNN_HOME", Path(base) / "cifarcnn"))


def default_data_dir() -> Path:
    return home_dir() / "data"


# ---------------------------------------------------------------------------- decoding


BAD_IMAGE_HINT = "fix or remove the file (training data: --skip-bad-images skips such files)"


def _eight_bit(im: Image.Image) -> Image.Image:
    """One-channel images deeper than 8 bits as 8-bit grey. PIL's own conversion clips
    16-bit grey (scientific cameras, some scanners) at 255, which turns all but the
    darkest pixels white; floats are taken as [0, 1] when they fit, else as 0-255."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    top = a.max(initial=0.0)
    if im.mode == "F":
        a = a * 255 if top <= 1.0 else a
    elif im.mode.startswith("I;16") or top > 255:
        a = a / 257  # 65535 -> 255
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


def _upright(im: Image.Image) -> Image.Image:
    """The image as a viewer shows it: cameras store a photo held upright sideways, with
    an EXIF orientation that says how to turn it. A damaged EXIF block (PIL's parser
    raises struct, key and type errors) leaves the image as stored: the pixels decode
    on their own and are still worth classifying."""
    try:
        if im.getexif().get(ORIENTATION, 1) in (None, 1):
            return im
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def decode_image(data: bytes, name: str, hint: str = BAD_IMAGE_HINT) -> np.ndarray:
    """Decode one image file to (32, 32, 3) uint8 RGB, converting mode and size as needed.

    `hint`: what the error tells the user to do with an image that does not decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise CifarError(f"{name}: image claims {w}x{h} pixels, more than the "
                                 f"{MAX_PIXELS:,} allowed (a decompression bomb?); remove it")
            if (w, h) != (32, 32):
                im.draft("RGB", (32, 32))  # JPEG: decode big photos at a reduced scale
            im = _upright(im)
            rgb = im if im.mode == "RGB" else _eight_bit(im).convert("RGB")
            if rgb.size != (32, 32):
                rgb = rgb.resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=2.0)
            return np.asarray(rgb, dtype=np.uint8)
    except CifarError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        # PIL names the in-memory buffer, not the file, when it knows no format for it
        why = ("no image format PIL knows" if isinstance(e, UnidentifiedImageError)
               else str(e))
        raise CifarError(f"{name}: not a readable image ({why}); {hint}") from None


# What a damaged or hostile batch pickle makes unpickling raise (LookupError: an unknown
# codec name in a mutated bytes record, found by the fuzz test).
PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
                 AttributeError, IndexError, LookupError, OverflowError)


def _read_py_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = pickles.loads(data)
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
    except PICKLE_ERRORS as e:
        raise CifarError(f"{name}: not a CIFAR python batch ({e})") from None
    if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise CifarError(f"{name}: expected N x 3072 pixels and N labels, got {x.shape} and "
                         f"{len(y)}")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), y


def _read_py_meta(name: str, data: bytes, key: bytes = b"label_names") -> list[str]:
    """Class names from CIFAR-10's batches.meta, or (key fine_label_names) CIFAR-100's
    meta."""
    try:
        meta = pickles.loads(data)
        names = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[key]]
    except PICKLE_ERRORS as e:
        raise CifarError(f"{name}: not a CIFAR {name.rsplit('/', 1)[-1]} file ({e})") from None
    if not names or len(set(names)) != len(names):
        raise CifarError(f"{name}: class names missing or repeated")
    return names


def _read_bin_batch(data: bytes, name: str, label_bytes: int = 1) -> tuple[np.ndarray,
                                                                         np.ndarray]:
    """Binary records: label byte(s), then 3,072 pixels. CIFAR-100's records hold two
    labels, coarse then fine; the last is the one used."""
    size = label_bytes + 3072
    if len(data) == 0 or len(data) % size:
        raise CifarError(f"{name}: {len(data)} bytes is not a whole number of {size:,}-byte "
                         f"CIFAR-{10 if label_bytes == 1 else 100} records (truncated?)")
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, size)
    x = rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return x, rec[:, label_bytes - 1].astype(np.int64)


def _read_bin_names(name: str, raw: bytes) -> list[str]:
    """Class names from a binary set's text file, one per line (batches.meta.txt,
    CIFAR-100's fine_label_names.txt)."""
    try:
        return [c for c in raw.decode().split() if c]
    except UnicodeDecodeError:
        raise CifarError(f"{name}: class names are not UTF-8 text") from None


def _check_labels(y: np.ndarray, n_classes: int, where: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise CifarError(f"{where}: labels outside 0..{n_classes - 1}")


# ------------------------------------------------------------------------ source readers


def _decode_chunk(items: list[tuple[str, bytes]], skip_bad: bool) -> list[np.ndarray | None]:
    """Decode a chunk of images (in a worker process); None marks a skipped bad image."""
    out: list[np.ndarray | None] = []
    for name, data in items:
        try:
            out.append(decode_image(data, name))
        except CifarError:
            if not skip_bad:
                raise
            out.append(None)
    return out


class _Collector:
    """Sorts the files of one source, whichever form it has, into a CifarData.

    Images are decoded in chunks; once a source proves big (more than one
    chunk), chunks go to a pool of processes, one per core, while this
    process keeps reading the archive: 60,000 JPEGs in ~5 s on 2 cores.
    """

    CHUNK = 2000

    def __init__(self, source: Path, skip_bad_images: bool) -> None:
        self.source = source
        self.skip_bad = skip_bad_images
        self.py: dict[str, tuple[str, bytes]] = {}  # base name -> (full name, bytes)
        self.bin: dict[str, tuple[str, bytes]] = {}
        self.py100: dict[str, tuple[str, bytes]] = {}
        self.bin100: dict[str, tuple[str, bytes]] = {}
        self.keys: list[tuple[str, str, str]] = []  # (split, class, file name) per image
        self.pending: list[tuple[str, bytes]] = []
        self.decoded: list = []  # arrays lists, or futures of them, chunk by chunk
        self.pool: ProcessPoolExecutor | None = None
        self.prefix = f"{source}:" if archives.is_archive(source) else ""
        self.skipped = 0

    def add(self, name: str, read) -> None:
        parts = name.split("/")
        base = parts[-1]
        if base.startswith("."):
            return
        if base in (*PY_TRAIN, "test_batch", "batches.meta"):
            self.py[base] = (self.prefix + name, read())
        elif base in (*BIN_TRAIN, "test_batch.bin", "batches.meta.txt"):
            self.bin[base] = (self.prefix + name, read())
        elif base in PY_100:
            self.py100[base] = (self.prefix + name, read())
        elif base in BIN_100:
            self.bin100[base] = (self.prefix + name, read())
        elif (base.lower().endswith(IMAGE_SUFFIXES) and len(parts) >= 3
              and parts[-3] in ("train", "test")):
            self.keys.append((parts[-3], parts[-2], base))
            self.pending.append((self.prefix + name, read()))
            if len(self.pending) >= self.CHUNK:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        if self.pool is None and self.decoded:  # second chunk: the source is big, go parallel
            self.pool = ProcessPoolExecutor(max(1, min(os.cpu_count() or 1, 8)))
        if self.pool is None:
            self.decoded.append(_decode_chunk(self.pending, self.skip_bad))
        else:
            self.decoded.append(self.pool.submit(_decode_chunk, self.pending, self.skip_bad))
        self.pending = []

    def _images_decoded(self) -> dict[tuple[str, str, str], np.ndarray]:
        self._flush()
        try:
            arrays = [a for chunk in self.decoded
                      for a in (chunk if isinstance(chunk, list) else chunk.result())]
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)
        self.skipped = sum(a is None for a in arrays)
        return {k: a for k, a in zip(self.keys, arrays, strict=True) if a is not None}

    def result(self) -> CifarData:
        src = str(self.source)
        if all(k in self.py for k in (*PY_TRAIN, "test_batch")):
            tr = [_read_py_batch(self.py[k][1], self.py[k][0]) for k in PY_TRAIN]
            te = _read_py_batch(self.py["test_batch"][1], self.py["test_batch"][0])
            classes = list(CLASSES)
            if "batches.meta" in self.py:
                classes = _read_py_meta(*self.py["batches.meta"])
            return self._finish(tr, te, classes, src)
        if all(k in self.bin for k in (*BIN_TRAIN, "test_batch.bin")):
            tr = [_read_bin_batch(self.bin[k][1], self.bin[k][0]) for k in BIN_TRAIN]
            te = _read_bin_batch(self.bin["test_batch.bin"][1], self.bin["test_batch.bin"][0])
            classes = list(CLASSES)
            if "batches.meta.txt" in self.bin:
                classes = _read_bin_names(*self.bin["batches.meta.txt"])
            return self._finish(tr, te, classes, src)
        # CIFAR-100 (its meta is required: it holds the class names, and without it two
        # stray files named train and test would pass for the data set)
        if all(k in self.py100 for k in PY_100):
            tr = [_read_py_batch(self.py100["train"][1], self.py100["train"][0])]
            te = _read_py_batch(self.py100["test"][1], self.py100["test"][0])
            classes = _read_py_meta(*self.py100["meta"], key=b"fine_label_names")
            return self._finish(tr, te, classes, src)
        if all(k in self.bin100 for k in BIN_100):
            tr = [_read_bin_batch(self.bin100["train.bin"][1], self.bin100["train.bin"][0], 2)]
            te = _read_bin_batch(self.bin100["test.bin"][1], self.bin100["test.bin"][0], 2)
            return self._finish(tr, te, _read_bin_names(*self.bin100["fine_label_names.txt"]),
                                src)
        if self.keys:
            return self._images(src)
        raise CifarError(
            f"{src}: found no CIFAR-10 data in it: expected the official python batches "
            "(data_batch_1..5, test_batch), binary batches (data_batch_1..5.bin, "
            "test_batch.bin), CIFAR-100's (train, test, meta; or train.bin, test.bin, "
            "fine_label_names.txt), or image folders train/<class>/*.png|jpg and "
            "test/<class>/...")

    def _finish(self, tr, te, classes: list[str], src: str) -> CifarData:
        x = np.concatenate([b[0] for b in tr])
        y = np.concatenate([b[1] for b in tr])
        _check_labels(y, len(classes), src)
        _check_labels(te[1], len(classes), src)
        return CifarData(x, y, te[0], te[1], classes, src)

    def _images(self, src: str) -> CifarData:
        images = self._images_decoded()
        classes = sorted({c for (_, c, _) in images})
        # test/ alone is enough to evaluate on (a folder of one's own labelled photos);
        # training refuses an empty train split (train.split_data)
        if not any(s == "test" for (s, _, _) in images):
            raise CifarError(f"{src}: no test/<class>/ images found; image folders need "
                             "test/<class>/ (and train/<class>/ to train on)")
        index = {c: i for i, c in enumerate(classes)}
        out = {}
        for split in ("train", "test"):
            keys = sorted(k for k in images if k[0] == split)
            x = (np.stack([images[k] for k in keys]) if keys
                 else np.zeros((0, 32, 32, 3), dtype=np.uint8))
            y = np.array([index[k[1]] for k in keys], dtype=np.int64)
            out[split] = (x, y)
        return CifarData(*out["train"], *out["test"], classes, src, self.skipped)


def _read_file(path: Path) -> bytes:
    """A data file's bytes, or one clear error if it cannot be read (a dangling link, no
    permission): found by walking a folder, so the user may not know it is there."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise CifarError(f"{path}: cannot read this data file ({e.strerror or e}); "
                         "fix its permissions or link, or remove it") from None


def read_source(source: Path, skip_bad_images: bool = False) -> CifarData:
    """Read a data set from a folder or archive, with no cache involved."""
    col = _Collector(source, skip_bad_images)
    if source.is_file():
        if not archives.is_archive(source):
            raise CifarError(f"{source}: not a folder or a .tar.gz/.tgz/.tar/.zip archive")
        for name, data in archives.iter_members(source):
            col.add(name, lambda d=data: d)
    elif source.is_dir():
        for root, dirs, files in os.walk(source, followlinks=False):
            dirs.sort()
            for f in sorted(files):
                path = Path(root, f)
                col.add(path.relative_to(source).as_posix(), lambda p=path: _read_file(p))
    else:
        raise CifarError(f"{source}: no such file or folder")
    return col.result()


# ------------------------------------------------------------------------------- cache


def _fingerprint(source: Path) -> str:
    """Cheap identity of a source: size and mtime of the file, or of every file in the folder."""
    if source.is_file():
        st = source.stat()
        return f"file:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for f in sorted(files):
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:  # a dangling link: only an error if reading needs the file
                h.update(f"{root}/{f}:unreadable\n".encode())
                continue
            h.update(f"{root}/{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "dir:" + h.hexdigest()


def cache_path(source: Path) -> Path:
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    return home_dir() / "decoded" / f"{key}.safetensors"


def _load_cache(path: Path, source: Path, fingerprint: str) -> CifarData | None:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        if (meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint
                or meta.get("source") != str(source.resolve())):
            return None
        t = load_file(str(path))
        return CifarData(t["train_images"], t["train_labels"].astype(np.int64),
                         t["test_images"], t["test_labels"].astype(np.int64),
                         json.loads(meta["classes"]), str(source), int(meta.get("skipped", 0)))
    except Exception:
        return None


def _save_cache(path: Path, data: CifarData, source: Path, fingerprint: str) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    meta = {"version": CACHE_VERSION, "fingerprint": fingerprint,
            "source": str(source.resolve()), "classes": json.dumps(data.classes),
            "skipped": str(data.skipped)}
    tensors = {"train_images": data.train_images,
               "train_labels": data.train_labels.astype(np.uint8),
               "test_images": data.test_images,
               "test_labels": data.test_labels.astype(np.uint8)}
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache slows the next load, nothing more
        tmp.unlink(missing_ok=True)
        print(f"warning: could not write the decode cache {path} ({e})", file=sys.stderr)


def load_source(source: Path, use_cache: bool = True, skip_bad_images: bool = False,
                verbose: bool = False) -> CifarData:
    """Read `source`, through the decode cache unless `use_cache` is False."""
    fp = _fingerprint(source) if use_cache else ""
    cpath = cache_path(source)
    if use_cache and (hit := _load_cache(cpath, source, fp)) is not None:
        return hit
    t0 = time.perf_counter()
    data = read_source(source, skip_bad_images)
    if verbose:
        skipped = f", skipped {data.skipped} unreadable images" if data.skipped else ""
        print(f"decoded {source}: {len(data.train_labels):,} train + {len(data.test_labels):,} "
              f"test images in {time.perf_counter() - t0:.1f}s{skipped}", file=sys.stderr)
    if use_cache and len(data.classes) <= 255:
        _save_cache(cpath, data, source, fp)
    return data


# ------------------------------------------------------------------- finding the data


def _official_in(folder: Path) -> Path | None:
    """The official data set (extracted or archived) inside `folder`, if there."""
    for url, _, dirname in OFFICIAL.values():  # CIFAR-10 first
        for cand in (folder / dirname, folder / url.rsplit("/", 1)[1]):
            if cand.exists():
                return cand
    return None


def _inside(p: Path) -> Path:
    """A folder that holds the official data set stands for it; anything else is itself."""
    return (_official_in(p) or p) if p.is_dir() else p


def fetch_official(folder: Path, fmt: str = "python") -> Path:
    """Download the official archive into `folder`, verify its MD5, extract it safely."""
    url, md5, dirname = OFFICIAL[fmt]
    archive = archives.download(url, folder / url.rsplit("/", 1)[1], md5)
    target = folder / dirname
    if not target.exists():
        archives.safe_extract(archive, folder / f".{dirname}.extract")
        inner = folder / f".{dirname}.extract" / dirname
        if not inner.is_dir():
            raise CifarError(f"{archive}: has no {dirname}/ folder; not the official archive")
        os.replace(inner, target)
        shutil.rmtree(folder / f".{dirname}.extract", ignore_errors=True)
    return target


def resolve_source(data: str | os.PathLike | None, download: bool = False) -> Path:
    """Where the data is: `data`, else $CIFAR10_DATA, else the default folder (or --download)."""
    if data is not None:
        p = Path(data).expanduser()
        if p.exists():
            return _inside(p)
        if download:
            # a path named after an official archive or folder fetches that data set
            # beside it (--data data/cifar-100-python); any other, CIFAR-10 into it
            for fmt, (url, _, dirname) in OFFICIAL.items():
                if p.name in (dirname, url.rsplit("/", 1)[1]):
                    return fetch_official(p.parent, fmt)
            return fetch_official(p)
        raise CifarError(f"--data {p}: no such file or folder; pass the path of CIFAR-10 "
                         "(archive or folder), or add --download to fetch it there")
    env = os.environ.get("CIFAR10_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise CifarError(f"$CIFAR10_DATA={env}: no such file or folder; fix the variable "
                             "or pass --data PATH")
        return _inside(p)
    default = default_data_dir()
    if found := _official_in(default):
        return found
    if download:
        return fetch_official(default)
    raise CifarError(f"no CIFAR-10 data found: pass --data PATH, or set $CIFAR10_DATA, or put "
                     f"it in {default}, or add --download to fetch the official archive there")


def load_cifar10(data: str | os.PathLike | None = None, download: bool = False,
                 use_cache: bool = True, skip_bad_images: bool = False,
                 verbose: bool = False) -> CifarData:
    """Find and load CIFAR-10 (see `resolve_source` for where it looks)."""
    return load_source(resolve_source(data, download), use_cache, skip_bad_images, verbose)


# -------------------------------------------------------------------------- subsets


def sample(total: int, n: int, seed: int = 0) -> np.ndarray:
    """Indices of a fixed random sample of min(n, total) of `total` items (sorted).

    For checks on "some test images": a prefix would do only for a shuffled set, and
    the JPEG copy, like an image folder, stores its images grouped by class.
    """
    order = np.random.default_rng(seed).permutation(total)
    return np.sort(order[:min(n, total)])


def balanced_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of a fixed class-balanced subset of size n (sorted).

    Every class gets n // C images (the first n % C classes one more), drawn by
    a fixed permutation: the same n always gives the same images, and a
    smaller subset is contained in a larger one.
    """
    classes = np.unique(labels)
    if n <= 0 or n > len(labels):
        raise CifarError(f"subset size {n} must be between 1 and {len(labels)}")
    rng = np.random.default_rng(seed)
    chosen = []
    for i, c in enumerate(classes):
        k = n // len(classes) + (1 if i < n % len(classes) else 0)
        idx = np.flatnonzero(labels == c)
        if k > len(idx):
            raise CifarError(f"subset of {n} needs {k} images of class {c}, only {len(idx)} exist")
        chosen.append(idx[rng.permutation(len(idx))[:k]])
    return np.sort(np.concatenate(chosen))
