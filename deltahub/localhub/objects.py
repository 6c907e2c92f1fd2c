"""Content-addressed blob store of the embedded Hub: every file version is one immutable object
named by the sha256 of its bytes, written to a temp file and renamed into place.

Layout under ``root``: ``objects/<sha[:2]>/<sha[2:]>`` (the blobs) and ``tmp/`` (uploads in
flight; same filesystem so the final ``os.replace`` is atomic). A killed writer leaves at most an
orphan in ``tmp/`` that no reader ever sees.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20  # bytes read/written per step when streaming
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"


class ObjectMismatchError(ValueError):
    """Uploaded bytes do not hash to (or are not the size of) the announced object."""


class IncompleteUploadError(OSError):
    """The request body ended before the announced number of bytes arrived."""


def git_blob_oid(data: bytes) -> str:
    """Git's blob id: sha1 of ``b"blob <len>\\0" + data`` (the Hub's ``blobId`` / ETag of small files)."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git in place of a large file."""
    return LFS_POINTER.format(oid=sha256, size=size).encode()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` so a reader sees either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


class ObjectStore:
    """Immutable blobs keyed by sha256. Thread- and process-safe: writers never share a temp file
    and the final rename either creates the object or finds an identical one already there."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.objects / sha256[:2] / sha256[2:]

    def has(self, sha256: str, size: int | None = None) -> bool:
        try:
            st = self.path(sha256).stat()
        except (OSError, ValueError):
            return False
        return size is None or st.st_size == size

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path(sha256), "rb")

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def put_bytes(self, data: bytes, *, fsync: bool = True) -> str:
        """Store ``data``; returns its sha256. ``fsync=False`` for many small objects that the
        caller makes durable at once with ``sync()`` before anything references them."""
        return self.put_stream([data], expected_size=len(data), fsync=fsync)

    @staticmethod
    def sync() -> None:
        """Flush all written objects to disk (one call instead of one fsync per small file)."""
        os.sync()

    def put_stream(
        self,
        chunks: Iterable[bytes],
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        fsync: bool = True,
    ) -> str:
        """Stream ``chunks`` into a temp file, hash them, and rename into place only if complete
        and (when given) matching ``expected_sha256`` / ``expected_size``. Returns the sha256.
        Raises IncompleteUploadError / ObjectMismatchError (and leaves nothing behind) otherwise."""
        tmp = self.tmp / f"upload-{uuid.uuid4().hex}.part"
        h = hashlib.sha256()
        n = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    n += len(chunk)
                    f.write(chunk)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            if expected_size is not None and n != expected_size:
                raise IncompleteUploadError(f"received {n} bytes, expected {expected_size}")
            digest = h.hexdigest()
            if expected_sha256 is not None and digest != expected_sha256:
                raise ObjectMismatchError(f"content hashes to {digest}, expected {expected_sha256}")
            final = self.path(digest)
            if not final.exists():
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
                if fsync:
                    fsync_dir(final.parent)
            return digest
        finally:
            if tmp.exists():
                tmp.unlink()

    def iter_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Yield bytes ``[start, end)`` of an object in CHUNK-sized pieces."""
        with self.open(sha256) as f:
            f.seek(start)
            left = (end if end is not None else self.size(sha256)) - start
            while left > 0:
                buf = f.read(min(CHUNK, left))
                if not buf:
                    break
                left -= len(buf)
                yield buf

    def clean_tmp(self, older_than_s: float = 3600.0) -> int:
        """Remove what killed writers left in tmp/ (files and staging folders older than
        ``older_than_s``). Returns the number of entries removed."""
        now = time.time()
        removed = 0
        for p in self.tmp.iterdir():
            try:
                if now - p.lstat().st_mtime <= older_than_s:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed += 1
            except OSError:
                pass
        return removed
