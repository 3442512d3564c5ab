"""Hostile inputs: bombs, fake images, and fuzzed archives and images.

Every failure must be the project's own CifarError (one clear line), never a
stray exception from PIL, tarfile, zipfile or pickle.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import sys
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from formats import _tar, image_folder, make_split, png_bytes, py2_pickle, python_archive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cifarcnn
from cifarcnn.cli import main
from cifarcnn.datasets import MAX_PIXELS, decode_image, read_source
from cifarcnn.errors import CifarError
from cifarcnn.weights import FIELDS, SHIPPED


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels with almost no data: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_by_name(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 1000
    with pytest.raises(CifarError, match=r"bomb\.png: .*decompression bomb"):
        decode_image(_png_header_only(side, side), "bomb.png")
    root = image_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "bomb.png").write_bytes(_png_header_only(side, side))
    with pytest.raises(CifarError, match=r"train/cat/bomb\.png"):
        read_source(root)
    assert read_source(root, skip_bad_images=True).skipped == 1


def test_non_image_with_image_extension_is_named(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs")
    (root / "test" / "frog" / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    with pytest.raises(CifarError, match=r"test/frog/notes\.jpg: not a readable image") as e:
        read_source(root)
    # the reason names the file's problem, not PIL's in-memory buffer object
    assert "no image format PIL knows" in str(e.value) and "BytesIO" not in str(e.value)
    d = read_source(root, skip_bad_images=True)
    assert d.skipped == 1 and len(d.test_labels) == 6


def test_cli_bad_image_data_is_one_line_and_nothing_written(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "run"
    code = main(["train", "--data", str(root), "--out", str(out), "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "broken.png" in err[0]
    assert not out.exists()


# --------------------------------------------------------------------------- fuzzing

def _valid_png() -> bytes:
    return png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _valid_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = np.random.default_rng(1).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    Image.fromarray(img).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def _jpeg_with_exif() -> bytes:
    """A photo stored sideways with its EXIF orientation (6: turn clockwise to show)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Camera"
    buf = io.BytesIO()
    img = np.random.default_rng(2).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    Image.fromarray(img).save(buf, format="JPEG", quality=75, exif=exif.tobytes())
    return buf.getvalue()


SEEDS = {"png": _valid_png(), "jpeg": _valid_jpeg()}
EXIF_JPEG = _jpeg_with_exif()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, value in edits:
        b[pos % len(b)] = value
    return bytes(b[:cut] if cut is not None else b)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)


@settings(max_examples=1500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(SEEDS)), edits=edits,
       cut=st.one_of(st.none(), st.integers(0, 2000)))
def test_fuzz_decode_image_mutated(kind, edits, cut):
    data = _mutate(SEEDS[kind], edits, cut)
    try:
        img = decode_image(data, f"fuzz.{kind}")
    except CifarError as e:
        assert "fuzz." in str(e)
    else:
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_fuzz_exif_blocks_mutated():
    """A damaged EXIF block, in the bytes the orientation is read from: PIL's parser raised
    struct errors from ImageOps.exif_transpose. The pixels must still decode, or the file
    be named in one error. (Seeded byte edits: hypothesis's shrinking search met no such
    block in 800 examples; these 3,000 meet it.)"""
    import random

    start = EXIF_JPEG.index(b"Exif")
    rng = random.Random(0)
    decoded = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's "Corrupt EXIF data" (the CLI's are silenced)
        for _ in range(3000):
            edits = [(start + rng.randint(0, 60), rng.randint(0, 255))
                     for _ in range(rng.randint(1, 4))]
            try:
                img = decode_image(_mutate(EXIF_JPEG, edits, None), "fuzz.jpg")
            except CifarError as e:
                assert "fuzz.jpg" in str(e)
            else:
                assert img.shape == (32, 32, 3) and img.dtype == np.uint8
                decoded += 1
    assert decoded > 2000  # most damaged EXIF blocks leave a decodable photo


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(data=st.binary(max_size=600))
def test_fuzz_decode_image_random_bytes(data):
    with contextlib.suppress(CifarError):
        decode_image(data, "random.png")


def _python_archive_with(path: Path, edit) -> tuple[Path, list]:
    """A python-pickle archive (Python 2's pickles) whose first batch went through `edit`."""
    train, test = make_split(n_per_batch=2)
    python_archive(path, train, test, python2=True)
    with tarfile.open(path) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    first = "cifar-10-batches-py/data_batch_1"
    files[first] = edit(files[first])
    return _tar(path, files), train


def test_pickle_memo_index_is_refused_before_allocating(tmp_path):
    """A LONG_BINPUT opcode's memo index makes CPython's unpickler grow its memo table to
    that size: one flipped byte in a fuzzed archive asked for 21 GB. Refused up front."""
    def huge_memo(data: bytes) -> bytes:
        assert data[2:3] == b"}"  # EMPTY_DICT, then memoised as entry 2**31 - 1
        return data[:3] + b"r" + struct.pack("<I", 2**31 - 1) + data[3:]

    arc, _ = _python_archive_with(tmp_path / "a.tar.gz", huge_memo)
    with pytest.raises(CifarError, match=r"data_batch_1: not a CIFAR python batch "
                                         r"\(memo index 2147483647"):
        read_source(arc)


def test_pickle_dtype_state_cannot_crash_the_process(tmp_path):
    """numpy's own dtype.__setstate__ segfaulted (numpy 2.4) on a fuzzed archive's dtype
    state; the reader never hands numpy pickled state, so the batch reads (its dtype is
    still plain uint8). In a child process, so that a crash fails this test alone."""
    good = (3, b"|", None, None, None, -1, -1, 0)
    bad = py2_pickle(good)[2:-1].replace(b"NNN", b"MwN")  # 20087 where the subarray was

    def mutate(data: bytes) -> bytes:
        assert data.count(py2_pickle(good)[2:-1]) == 1
        return data.replace(py2_pickle(good)[2:-1], bad)

    arc, train = _python_archive_with(tmp_path / "a.tar.gz", mutate)
    code = ("import sys, numpy as np\nfrom pathlib import Path\n"
            "from cifarcnn.datasets import read_source\n"
            "d = read_source(Path(sys.argv[1]))\nnp.save(sys.argv[2], d.train_images)\n")
    out = tmp_path / "x.npy"
    r = subprocess.run([sys.executable, "-c", code, str(arc), str(out)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_array_equal(np.load(out), np.concatenate([b[0] for b in train]))


@pytest.mark.parametrize("size", [2**70, 2**50], ids=["past-an-index", "a-petabyte"])
def test_tar_header_claiming_a_huge_size_is_refused(tmp_path, size):
    """A pax header whose size field (base-256) claims more than an index can hold, or a
    petabyte, made tarfile raise OverflowError or MemoryError (found by a longer fuzz)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("x" * 120 + "/train/cat/a.png")  # long: a pax header first
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    raw = bytearray(buf.getvalue())
    assert raw[156:157] == b"x"  # the first block is the pax header
    raw[124:136] = b"\x80" + size.to_bytes(11, "big")
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\x00 " % sum(raw[:512])
    path = tmp_path / "huge.tar"
    path.write_bytes(bytes(raw))
    with pytest.raises(CifarError, match=r"huge\.tar: cannot read the archive"):
        read_source(path)


def _archive_seeds(root: Path) -> dict[str, bytes]:
    """The fuzz test's valid archives, the same bytes in every run (their timestamps
    fixed), so that the derandomised fuzzer mutates the same inputs each time."""
    train, test = make_split(n_per_batch=2, seed=0)
    gz = python_archive(root / "a.tar.gz", train, test).read_bytes()
    seeds = {"py.tar.gz": gz[:4] + bytes(4) + gz[8:]}  # gzip's header: MTIME at bytes 4-7
    folder = image_folder(root / "imgs", per_class=1, classes=("cat", "dog"))
    for p in [folder, *folder.rglob("*")]:
        os.utime(p, (946684800, 946684800))  # 2000-01-01, for the zip's and tar's headers
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, p.relative_to(folder.parent).as_posix())
    seeds["imgs.zip"] = buf.getvalue()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(folder, arcname="imgs")
    seeds["imgs.tar"] = buf.getvalue()
    return seeds


@pytest.fixture(scope="module")
def archive_seeds(tmp_path_factory) -> dict[str, bytes]:
    return _archive_seeds(tmp_path_factory.mktemp("seeds"))


def test_fuzz_archives_mutated(archive_seeds, tmp_path_factory):
    """A few thousand mutated and truncated archives: each reads, or fails with CifarError."""
    folder = tmp_path_factory.mktemp("fuzz")
    counts = {"ok": 0, "refused": 0}

    @settings(max_examples=1500, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(kind=st.sampled_from(sorted(archive_seeds)), edits=edits,
           cut=st.one_of(st.none(), st.integers(0, 4000)))
    def check(kind, edits, cut):
        path = folder / f"data.{kind.split('.', 1)[1]}"
        path.write_bytes(_mutate(archive_seeds[kind], edits, cut))
        try:
            read_source(path)
        except CifarError as e:
            assert str(path) in str(e)  # the message says which file (and member) it is
            counts["refused"] += 1
        else:
            counts["ok"] += 1

    check()
    assert counts["refused"] > 100  # the fuzzer really produced broken archives


# ------------------------------------------------------------------ weights' metadata


def _weights_with(path: Path, shipped: str, edits: dict[str, str]) -> Path:
    """A copy of shipped weights whose metadata fields are replaced by `edits` (JSON text)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = SHIPPED / f"{shipped}.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = {**f.metadata(), **edits}
    save_file(load_file(str(src)), str(path), metadata=meta)
    return path


@pytest.mark.parametrize(("field", "value"), [
    ("model_kwargs", "null"), ("precision", '{"a": 1}'), ("eval_batch_size", "0"),
    ("eval_batch_size", '"bf16"'), ("classes", "true"), ("classes", '["cat", "cat"]'),
    ("tta", '"mirror"'), ("std", "[0.2, 0, 0.2]"), ("mean", '"x"'), ("channels_last", "1"),
    ("val_accuracy", '"high"'), ("model", "[1, 2]")])
def test_weights_with_a_bad_metadata_field_are_refused_by_name(tmp_path, field, value):
    path = _weights_with(tmp_path / "w.safetensors", "paper-cnn", {field: value})
    with pytest.raises(CifarError, match=rf"w\.safetensors: metadata field '{field}' is "):
        cifarcnn.load(path)


@pytest.mark.parametrize("kwargs", ['{"widths": [1000000, 1000000, 1000000]}',
                                    '{"num_classes": -3}', '{"num_classes": 1000000000}'])
def test_weights_whose_model_arguments_do_not_fit_allocate_nothing(tmp_path, kwargs):
    """Model arguments are checked against the file's tensor shapes on the meta device
    first: a width of a million would otherwise ask for terabytes, and a negative class
    count raised a RuntimeError."""
    path = _weights_with(tmp_path / "w.safetensors", "fast", {"model_kwargs": kwargs})
    with pytest.raises(CifarError, match=r"w\.safetensors: (tensors do not fit model fast|"
                                         r"model fast: )"):
        cifarcnn.load(path)


def test_cli_bad_weights_metadata_is_one_line(tmp_path, capsys):
    path = _weights_with(tmp_path / "w.safetensors", "paper-cnn", {"tta": '"mirror"'})
    img = tmp_path / "a.png"
    img.write_bytes(_valid_png())
    assert main(["predict", "--weights", str(path), str(img)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metadata field 'tta'" in err[0] and "Traceback" not in err[0]


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40)
                     | st.floats(allow_nan=True) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def test_fuzz_weights_metadata(tmp_path_factory):
    """Any JSON in the fields inference reads: the weights load and predict, or fail with
    CifarError (a hand fuzz of these fields found 22 other exceptions before)."""
    import json

    folder = tmp_path_factory.mktemp("wfuzz")
    images = np.zeros((2, 32, 32, 3), np.uint8)
    counts = {"ok": 0, "refused": 0}

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(edits=st.dictionaries(st.sampled_from(sorted(FIELDS)), _json, min_size=1, max_size=3))
    def check(edits):
        path = _weights_with(folder / "w.safetensors", "paper-cnn",
                             {k: json.dumps(v) for k, v in edits.items()})
        try:
            cifarcnn.load(path).predict(images)
        except CifarError:
            counts["refused"] += 1
        else:
            counts["ok"] += 1

    check()
    assert counts["refused"] > 50


@pytest.mark.parametrize("text", ['{"classes": true}', '{"tta": "flip"}', "{not json", "[1]"])
def test_export_with_bad_metadata_is_refused(tmp_path, text):
    """An export's metadata gets the same checks (a TorchScript file's extra file here)."""
    import torch

    from cifarcnn.export import META_KEY, load_exported
    from cifarcnn.info import describe

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path), _extra_files={META_KEY: text})
    with pytest.raises(CifarError, match=r"m\.pt: (damaged|metadata)"):
        load_exported(path)
    with pytest.raises(CifarError, match=r"m\.pt: (damaged|metadata)"):
        describe(str(path))  # `cifarcnn info`, which reads the metadata without loading
