"""Reading, extracting and downloading archives without trusting them.

Every member of a tar or zip is checked before anything is read or
written: absolute paths, `..` components, links and device files are
refused, and a truncated archive is an error rather than a partial data
set. Members are read straight from the archive, so reading a data set
never writes outside the cache.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import struct
import sys
import tarfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .errors import CifarError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# What a damaged archive makes tarfile/zipfile/zlib raise (found by tests/test_hostile.py's
# fuzzing): a bad header, a bad CRC, a corrupt deflate stream, an unsupported or encrypted
# member, a short read.
READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError,
               ValueError, struct.error, NotImplementedError, RuntimeError,
               OverflowError, MemoryError)  # a pax header's size of 2**70 or 2**50 bytes


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_name(archive: Path, name: str) -> str:
    """Return the member name normalised, or refuse it if it could escape."""
    if not name:  # zipfile's is_dir() itself fails on one (found by a longer fuzz)
        raise CifarError(f"{archive}: a member has an empty name; refusing the archive")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise CifarError(f"{archive}: member {name!r} has an absolute path; refusing the archive")
    if ".." in p.parts:
        raise CifarError(f"{archive}: member {name!r} points outside the archive (..); "
                         "refusing the archive")
    return str(p)


def iter_members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (name, contents) of every regular file in a tar or zip archive, in archive order.

    Folders are skipped; links, devices and unsafe names raise CifarError.
    """
    try:
        if archive.name.lower().endswith(".zip"):
            yield from _iter_zip(archive)
        else:
            yield from _iter_tar(archive)
    except CifarError:
        raise
    except READ_ERRORS as e:
        raise CifarError(f"{archive}: cannot read the archive ({e}); it may be truncated or "
                         "corrupt: download or copy it again") from None


def _iter_tar(archive: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(archive, "r:*") as tf:
        for m in tf:
            name = _check_name(archive, m.name)
            if m.isdir():
                continue
            if not m.isfile():
                kind = "link" if (m.issym() or m.islnk()) else "special file"
                raise CifarError(f"{archive}: member {m.name!r} is a {kind}; refusing the archive")
            f = tf.extractfile(m)
            assert f is not None
            data = f.read()
            if len(data) != m.size:
                raise CifarError(f"{archive}: member {m.name!r} is truncated")
            yield name, data


def _iter_zip(archive: Path) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = _check_name(archive, info.filename)
            if info.is_dir():
                continue
            mode = (info.external_attr >> 16) & 0o170000
            if mode not in (0, 0o100000):  # only regular files (0: made by tools that set none)
                raise CifarError(f"{archive}: member {info.filename!r} is a link or special "
                                 "file; refusing the archive")
            yield name, zf.read(info)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract `archive` into `dest`, refusing any member that could escape it.

    Extraction goes to a temporary folder beside `dest` and is renamed into
    place only when every member was read, so an error leaves no half data set.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, data in iter_members(archive):
            out = tmp / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        tmp.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str, timeout: float = 60.0,
             progress: bool | None = None) -> Path:
    """Fetch `url` to `dest` and check its MD5; an existing file with the right MD5 is kept.

    The body goes to `dest.part` first and is renamed only after the checksum
    matches, so a broken or tampered download never looks like a good file; the
    part is removed on any failure, Ctrl-C included. A transfer that ends before
    its announced length is named as such. `progress`: a bar on standard error
    (None: only where that is a terminal).
    """
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    got, total = 0, None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"downloading {dest.name}", leave=False, file=sys.stderr,
                      disable=None if progress is None else not progress) as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
    except (OSError, http.client.HTTPException) as e:
        part.unlink(missing_ok=True)
        raise CifarError(f"cannot download {url} ({e}); check the network, or download it by "
                         f"hand and pass its path with --data") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if total is not None and got != total:
        # http.client ends a body cut short without an error where the length was given
        part.unlink(missing_ok=True)
        raise CifarError(f"{url}: the transfer ended after {got:,} of its {total:,} bytes "
                         "(the connection dropped); try again")
    digest = md5sum(part)
    if digest != md5:
        part.unlink(missing_ok=True)
        raise CifarError(f"{url}: MD5 {digest} does not match the published {md5}; the download "
                         "is corrupt or was tampered with: try again")
    os.replace(part, dest)
    return dest
