import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from formats import binary_archive, image_folder, make_split, png_bytes, python_archive

from cifarcnn import archives, augment, datasets
from cifarcnn.datasets import balanced_subset, load_source, read_source, resolve_source
from cifarcnn.errors import CifarError


def _assert_same(data, train, test):
    np.testing.assert_array_equal(data.train_images, np.concatenate([b[0] for b in train]))
    np.testing.assert_array_equal(data.train_labels, np.concatenate([b[1] for b in train]))
    np.testing.assert_array_equal(data.test_images, test[0])
    np.testing.assert_array_equal(data.test_labels, test[1])
    assert data.classes == list(datasets.CLASSES)


@pytest.mark.parametrize("python2", [False, True], ids=["python3-pickles", "python2-pickles"])
def test_python_archive_reads_back_exactly(tmp_path, python2):
    """The official archive's pickles were written by Python 2 (numpy 1's module path,
    byte strings as BINSTRING); the reader takes those and Python 3's alike."""
    train, test = make_split()
    arc = python_archive(tmp_path / "cifar-10-python.tar.gz", train, test, python2=python2)
    _assert_same(read_source(arc), train, test)


def test_binary_archive_reads_back_exactly(tmp_path):
    train, test = make_split(seed=1)
    arc = binary_archive(tmp_path / "cifar-10-binary.tar.gz", train, test)
    _assert_same(read_source(arc), train, test)


def test_extracted_python_folder_found_inside_data_dir(tmp_path):
    train, test = make_split(seed=2)
    arc = python_archive(tmp_path / "a.tar.gz", train, test)
    archives.safe_extract(arc, tmp_path / "data")
    src = resolve_source(tmp_path / "data")
    assert src == tmp_path / "data" / "cifar-10-batches-py"
    _assert_same(load_source(src), train, test)


def test_python_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    train, test = make_split()
    arc = python_archive(tmp_path / "a.tar.gz", train, test)
    bad = tmp_path / "evil"
    archives.safe_extract(arc, bad)
    (bad / "cifar-10-batches-py" / "test_batch").write_bytes(pickle_dumps(Evil()))
    with pytest.raises(CifarError, match=r"refusing to load (posix|os)\.system"):
        read_source(bad / "cifar-10-batches-py")


def pickle_dumps(obj):
    import pickle

    return pickle.dumps(obj, protocol=2)


def test_download_verifies_md5(tmp_path):
    train, test = make_split()
    arc = python_archive(tmp_path / "src.tar.gz", train, test)
    md5 = archives.md5sum(arc)
    got = archives.download(arc.as_uri(), tmp_path / "dl" / "cifar.tar.gz", md5)
    assert got.read_bytes() == arc.read_bytes()
    with pytest.raises(CifarError, match="does not match the published"):
        archives.download(arc.as_uri(), tmp_path / "dl2" / "cifar.tar.gz", "0" * 32)
    assert not (tmp_path / "dl2" / "cifar.tar.gz").exists()
    assert not (tmp_path / "dl2" / "cifar.tar.gz.part").exists()


def test_download_over_http_names_a_cut_transfer_and_leaves_no_part(tmp_path, monkeypatch,
                                                                     capsys):
    import http.server
    import threading

    train, test = make_split()
    body = python_archive(tmp_path / "src.tar.gz", train, test).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # /cut: the connection drops halfway through the announced length
            self.wfile.write(body if self.path == "/full" else body[:len(body) // 2])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    md5 = archives.md5sum(tmp_path / "src.tar.gz")
    try:
        dest = tmp_path / "dl" / "c.tar.gz"
        with pytest.raises(CifarError, match=f"ended after {len(body) // 2:,} of its "
                           f"{len(body):,} bytes"):
            archives.download(f"{url}/cut", dest, md5)
        assert not dest.exists() and not dest.with_name("c.tar.gz.part").exists()
        capsys.readouterr()
        assert archives.download(f"{url}/full", dest, md5, progress=True).read_bytes() == body
        assert "downloading c.tar.gz" in capsys.readouterr().err  # the bar, on stderr

        class Stop:  # Ctrl-C during the transfer
            def __init__(self, **kwargs):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n):
                raise KeyboardInterrupt

        monkeypatch.setattr(archives, "tqdm", Stop)
        other = tmp_path / "dl" / "d.tar.gz"
        with pytest.raises(KeyboardInterrupt):
            archives.download(f"{url}/full", other, md5)
        assert not other.exists() and not other.with_name("d.tar.gz.part").exists()
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_official_uses_url_and_md5(tmp_path, monkeypatch):
    train, test = make_split()
    arc = python_archive(tmp_path / "cifar-10-python.tar.gz", train, test)
    served = tmp_path / "server" / "cifar-10-python.tar.gz"
    served.parent.mkdir()
    served.write_bytes(arc.read_bytes())
    monkeypatch.setitem(datasets.OFFICIAL, "python",
                        (served.as_uri(), archives.md5sum(arc), "cifar-10-batches-py"))
    src = resolve_source(tmp_path / "new", download=True)
    assert src == tmp_path / "new" / "cifar-10-batches-py"
    _assert_same(load_source(src), train, test)


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_cifar100_archives_read_with_their_fine_classes(tmp_path, fmt):
    from formats import FINE, binary100_archive, make_split_100, python100_archive

    train, test = make_split_100()
    build = python100_archive if fmt == "python" else binary100_archive
    data = load_source(build(tmp_path / f"cifar-100-{fmt}.tar.gz", train, test))
    assert data.classes == FINE
    np.testing.assert_array_equal(data.train_images, train[0])
    np.testing.assert_array_equal(data.train_labels, train[1])
    np.testing.assert_array_equal(data.test_images, test[0])
    np.testing.assert_array_equal(data.test_labels, test[1])
    # the extracted folder, found inside the folder given as --data
    archives.safe_extract(tmp_path / f"cifar-100-{fmt}.tar.gz", tmp_path / "x")
    assert resolve_source(tmp_path / "x") == tmp_path / "x" / f"cifar-100-{fmt}"


def test_cifar100_is_fetched_where_data_names_it_and_trains_100_classes(tmp_path,
                                                                         monkeypatch, capsys):
    from formats import FINE, make_split_100, python100_archive

    from cifarcnn.config import TrainConfig
    from cifarcnn.train import train

    (tmp_path / "server").mkdir()
    arc = python100_archive(tmp_path / "server" / "cifar-100-python.tar.gz",
                            *make_split_100(200, 40))
    monkeypatch.setitem(datasets.OFFICIAL, "python-100",
                        (arc.as_uri(), archives.md5sum(arc), "cifar-100-python"))
    src = resolve_source(tmp_path / "data" / "cifar-100-python", download=True)
    assert src == tmp_path / "data" / "cifar-100-python" and (src / "meta").is_file()
    assert (tmp_path / "data" / "cifar-100-python.tar.gz").is_file()  # kept, MD5-checked
    # the CIFAR-10 default is unchanged: another name fetches CIFAR-10 into that folder
    assert datasets.OFFICIAL["python"][2] == "cifar-10-batches-py"
    s = train(TrainConfig(model="fast", model_kwargs={"widths": [8, 16, 16]}, epochs=1,
                          batch_size=50, precision="fp32", data=str(src),
                          out=str(tmp_path / "run")), quiet=True)
    assert s["val_accuracy"] >= 0
    import cifarcnn

    clf = cifarcnn.load(tmp_path / "run")
    assert clf.classes == FINE
    assert clf.predict(np.zeros((3, 32, 32, 3), np.uint8)).shape == (3, 100)
    from cifarcnn.cli import main

    capsys.readouterr()
    assert main(["evaluate", "--weights", str(tmp_path / "run"), "--data", str(src)]) == 0
    out = capsys.readouterr().out
    assert "per class, the 10 lowest of 100 (--json has all): " in out
    assert len(out.splitlines()) <= 6  # not a hundred numbers
    pytest.importorskip("matplotlib")
    from cifarcnn.report import build_report

    # the charts of a 100-class run: the confusion matrix without its 10,000 numbers
    build_report([tmp_path / "run"], tmp_path / "report", data=load_source(src))
    assert (tmp_path / "report" / "confusion-run.png").is_file()


def test_published_checksums_are_the_official_ones():
    assert datasets.OFFICIAL["python"][:2] == (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a")
    assert datasets.OFFICIAL["binary"][1] == "c32a1d4ab5d03f1284b67883e8d87530"
    assert datasets.OFFICIAL["python-100"][:2] == (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85")
    assert datasets.OFFICIAL["binary-100"][:2] == (
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        "03b5dce01913d631647c71ecec9e9cb8")


def test_truncated_archive_is_refused(tmp_path):
    train, test = make_split()
    arc = python_archive(tmp_path / "a.tar.gz", train, test)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    with pytest.raises(CifarError, match="truncated or corrupt"):
        read_source(cut)


def _tar_with(path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        tf.addfile(info, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt", "/etc/passwd"])
def test_escaping_members_are_refused(tmp_path, name):
    info = tarfile.TarInfo(name)
    info.size = 1
    arc = _tar_with(tmp_path / "bad.tar.gz", info, b"x")
    with pytest.raises(CifarError, match="refusing the archive"):
        archives.safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE])
def test_links_and_devices_are_refused(tmp_path, kind):
    info = tarfile.TarInfo("train/cat/0.png")
    info.type = kind
    info.linkname = "/etc/passwd"
    arc = _tar_with(tmp_path / "bad.tar.gz", info)
    with pytest.raises(CifarError, match="refusing the archive"):
        read_source(arc)


def test_zip_with_dotdot_is_refused(tmp_path):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(CifarError, match="outside the archive"):
        read_source(z)


def test_zip_member_with_empty_name_is_refused(tmp_path):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(zipfile.ZipInfo(""), b"x")
    with pytest.raises(CifarError, match=r"bad\.zip: a member has an empty name"):
        read_source(z)


def test_image_folder_dir_tar_and_zip_agree(tmp_path):
    root = image_folder(tmp_path / "imgs")
    a = read_source(root)
    assert a.classes == ["cat", "dog", "frog"]
    assert a.train_images.shape == (6, 32, 32, 3)
    assert list(a.train_labels) == [0, 0, 1, 1, 2, 2]
    tar = tmp_path / "imgs.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(root, arcname="imgs")
    z = tmp_path / "imgs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(root.rglob("*.png")):
            zf.write(p, "imgs/" + p.relative_to(root).as_posix())
    for other in (read_source(tar), read_source(z)):
        np.testing.assert_array_equal(other.train_images, a.train_images)
        np.testing.assert_array_equal(other.test_labels, a.test_labels)


def test_odd_sizes_and_modes_are_converted(tmp_path):
    from PIL import Image

    root = image_folder(tmp_path / "imgs", per_class=1)
    Image.new("L", (100, 60), 128).save(root / "train" / "cat" / "big_gray.png")
    Image.new("RGBA", (7, 9), (255, 0, 0, 10)).save(root / "train" / "dog" / "tiny.png")
    Image.new("P", (64, 64)).save(root / "test" / "dog" / "pal.png")
    d = read_source(root)
    assert d.train_images.shape == (5, 32, 32, 3)
    assert d.test_images.shape == (4, 32, 32, 3)


def test_corrupt_image_error_names_the_file(tmp_path):
    root = image_folder(tmp_path / "imgs")
    bad = root / "train" / "dog" / "0001.png"
    bad.write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8))[:40])
    with pytest.raises(CifarError, match=r"train/dog/0001\.png: not a readable image"):
        read_source(root)
    d = read_source(root, skip_bad_images=True)
    assert d.skipped == 1 and len(d.train_labels) == 5


def test_dangling_links_in_a_data_folder(tmp_path):
    """A dangling link where no data is expected is ignored, also by the cache's
    fingerprint; one in place of a data file is one error that names it."""
    train, test = make_split(seed=3)
    arc = python_archive(tmp_path / "a.tar.gz", train, test)
    archives.safe_extract(arc, tmp_path / "data")
    folder = tmp_path / "data" / "cifar-10-batches-py"
    (folder / "notes.txt").symlink_to(tmp_path / "nowhere")
    _assert_same(load_source(folder), train, test)
    (folder / "data_batch_1").unlink()
    (folder / "data_batch_1").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CifarError, match=r"data_batch_1: cannot read this data file"):
        load_source(folder, use_cache=False)


def test_cache_rebuilds_when_source_changes(tmp_path):
    train, test = make_split()
    arc = python_archive(tmp_path / "a.tar.gz", train, test)
    first = load_source(arc)
    assert datasets.cache_path(arc).exists()
    again = load_source(arc)
    np.testing.assert_array_equal(first.train_images, again.train_images)
    train2, test2 = make_split(seed=9)
    python_archive(arc, train2, test2)
    os.utime(arc, ns=(1, 1))  # a different mtime whatever the clock resolution
    _assert_same(load_source(arc), train2, test2)


def test_missing_data_error_names_all_places(monkeypatch):
    monkeypatch.delenv("CIFAR10_DATA", raising=False)
    with pytest.raises(CifarError) as e:
        resolve_source(None)
    msg = str(e.value)
    for part in ("--data", "$CIFAR10_DATA", str(datasets.default_data_dir()), "--download"):
        assert part in msg


def test_balanced_subset_is_fixed_and_balanced():
    labels = np.repeat(np.arange(10), 50)
    a = balanced_subset(labels, 200)
    assert np.array_equal(a, balanced_subset(labels, 200))
    assert np.bincount(labels[a]).tolist() == [20] * 10
    with pytest.raises(CifarError):
        balanced_subset(labels, 10_000)


# ------------------------------------------------------------------------- augmentation


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)


def test_augment_keeps_shapes_and_labels_is_random_and_reproducible():
    x = _batch()
    padded = augment.pad_images(x)
    p1 = augment.epoch_plan(16, seed=0, epoch=0)
    p2 = augment.epoch_plan(16, seed=0, epoch=1)
    out1 = augment.crop_flip(padded, p1.order, p1.dx, p1.dy, p1.flip)
    out1b = augment.crop_flip(padded, *vars(augment.epoch_plan(16, 0, 0)).values())
    out2 = augment.crop_flip(padded, p2.order, p2.dx, p2.dy, p2.flip)
    assert out1.shape == (16, 32, 32, 3) and out1.dtype == torch.uint8
    assert torch.equal(out1, out1b), "same seed and epoch: same batch"
    assert not torch.equal(out1, out2), "another epoch: other crops"
    assert sorted(p1.order.tolist()) == list(range(16)), "a permutation: labels follow indices"


def test_crop_really_shifts_and_flip_mirrors():
    x = _batch(1)
    padded = augment.pad_images(x)
    i = torch.tensor([0])
    centre = augment.crop_flip(padded, i, torch.tensor([4]), torch.tensor([4]),
                               torch.tensor([False]))
    assert torch.equal(centre, x)
    shifted = augment.crop_flip(padded, i, torch.tensor([6]), torch.tensor([1]),
                                torch.tensor([False]))
    # window starts 2 right, 3 up: pixel (r, c) of the crop is x[r-3, c+2]
    assert torch.equal(shifted[0, 3:, :30], x[0, :29, 2:])
    assert torch.count_nonzero(shifted[0, :3]) == 0, "rows from the zero border"
    flipped = augment.crop_flip(padded, i, torch.tensor([4]), torch.tensor([4]),
                                torch.tensor([True]))
    assert torch.equal(flipped, x.flip(2))


def test_normalize_gives_channels_last_and_unit_scale():
    x = _batch(64)
    mean = torch.tensor(datasets.MEAN)
    std = torch.tensor(datasets.STD)
    y = augment.normalize(x, mean, std)
    assert y.shape == (64, 3, 32, 32)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = (x.permute(0, 3, 1, 2).float() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(y, ref)


def test_deeper_than_8_bit_grey_images_keep_their_tones():
    """PIL's own conversion clipped 16-bit grey at 255: a 0..65535 ramp came out as one
    black pixel and 31 white ones."""
    from PIL import Image

    from cifarcnn.datasets import decode_image

    ramp = np.tile(np.linspace(0, 1, 32), (32, 1))
    want = np.round(ramp * 255)
    for array, fmt in ((np.round(ramp * 65535).astype(np.uint16), "PNG"),
                       (np.round(ramp * 65535).astype(np.int32), "TIFF"),
                       (ramp.astype(np.float32), "TIFF"),
                       (np.round(ramp * 255).astype(np.int32), "TIFF")):  # 8-bit range in I
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, fmt)
        x = decode_image(buf.getvalue(), f"ramp.{fmt.lower()}")
        assert x.shape == (32, 32, 3) and (x[..., 0] == x[..., 2]).all()
        assert np.abs(x[..., 0].astype(int) - want).max() <= 1, (array.dtype, x[0, ::4, 0])


def test_photos_with_an_exif_orientation_are_turned_upright():
    """A phone stores a portrait photo's pixels sideways with EXIF orientation 6 ("turn
    90 degrees clockwise to show"); the net must see what the viewer sees."""
    from PIL import Image

    from cifarcnn.datasets import decode_image

    upright = np.zeros((60, 40, 3), np.uint8)
    upright[:10, :, 0] = 255  # a red band at the top
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged, plain = io.BytesIO(), io.BytesIO()
    stored.save(tagged, "JPEG", exif=exif.tobytes(), quality=95)
    Image.fromarray(upright).save(plain, "JPEG", quality=95)
    x, want = decode_image(tagged.getvalue(), "p.jpg"), decode_image(plain.getvalue(), "u.jpg")
    assert np.abs(x.astype(int) - want).max() <= 3
    assert x[:4, :, 0].mean() > 200 and x[-4:, :, 0].mean() < 20  # the band on top
