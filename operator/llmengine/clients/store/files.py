"""Local files of a transfer: a download's job per file, its byte ranges, hashing, whether it is already in place;
an upload's parts read into reused buffers."""

from __future__ import annotations

import base64
import ctypes
import errno
import functools
import hashlib
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmengine.clients.store import chain
from llmengine.clients.store.errors import SETTING_PART_CHECKSUM, StoreError
from llmengine.clients.store.layout import PARTIAL_SUFFIX, MiB


@dataclass
class FileJob:
    key: str
    dest: Path
    size: int
    sha256: str | None
    name: str
    url: str | None = None  # a presigned GET URL (an engine grant) to read instead of the key
    # The manifest's part checks (files uploaded in parts: chaining values or digests): each range is then one
    # part, verified on its own.
    part_size: int | None = None
    part_sha256: list[str] | None = None
    part_states: list[str] | None = None

    @property
    def partial(self) -> Path:
        return self.dest.with_name(self.dest.name + PARTIAL_SUFFIX)


@dataclass(frozen=True)
class RangeCheck:
    """What one range of a download is checked against, by the thread that receives it: a hash begun where the
    range begins, and the value it must reach once the range is in."""

    start: Callable[[], Any]
    result: Callable[[Any], str]
    want: str
    what: str = "sha256"  # what a mismatch names


def _hexdigest(sha: Any) -> str:
    return str(sha.hexdigest())


def _state(sha: Any) -> str:
    return str(sha.state())


def range_checks(job: FileJob, ranges: list[tuple[int, int]]) -> list[RangeCheck] | None:
    """One check per range, or None when the file can only be hashed whole, in order (a manifest without part
    checks, or chaining values where they are not available), or not at all (no SHA-256).

    With chaining values (`partStates`), part i's hash resumes from the value at its start (SHA-256's initial
    value for the first) and must end at the value the manifest gives for its end; the last part's must end at the
    file's SHA-256: so every part is checked on its own and the file's own digest with them."""
    if job.part_states is not None and chain.AVAILABLE:
        starts: list[str | None] = [None, *job.part_states]
        ends = [*job.part_states, job.sha256 or ""]
        last = len(ranges) - 1
        return [
            RangeCheck(
                start=functools.partial(chain.ChainedSha256, starts[i], off),
                result=_hexdigest if i == last else _state,
                want=ends[i],
                what="sha256" if i == last else "SHA-256 chaining value",
            )
            for i, (off, _) in enumerate(ranges)
        ]
    digests = job.part_sha256 or ([job.sha256] if len(ranges) == 1 and job.sha256 else None)
    if digests is None:
        return None
    return [RangeCheck(start=hashlib.sha256, result=_hexdigest, want=d) for d in digests]


# Files are hashed through one reused buffer of this size: copied in from the page cache, a block this small is still
# in the CPU's cache when SHA-256 reads it (1 MiB measured 5-10% less CPU per GiB than 8 MiB).
HASH_BLOCK = MiB


def byte_ranges(size: int, part: int) -> list[tuple[int, int]]:
    if size == 0 or part <= 0:
        return [(0, size)]
    return [(off, min(part, size - off)) for off in range(0, size, part)]


@functools.cache
def crc32c_function() -> Callable[[Any, int], int]:
    """awscrt's CRC32C (the CPU's CRC32 instruction: about 18 GiB/s on one core here, against 1.7 for SHA-256).
    Imported on first use: only uploads need it, and the operator, which never uploads, does not install it (the
    builder image does: the `builder` extra). A StoreError naming the fix where it is missing."""
    try:
        from awscrt.checksums import crc32c
    except ImportError as exc:
        raise StoreError(
            "CRC32C part checksums need the awscrt package (pip install 'llmengine-operator[builder]', as the "
            "builder image does), or set LLMENGINE_S3_PART_CHECKSUM=none",
            setting=SETTING_PART_CHECKSUM,
        ) from exc
    fn: Callable[[Any, int], int] = crc32c
    return fn


class Crc32c:
    """CRC32C of the bytes given to update(), as an upload's part checksum: x-amz-checksum-crc32c, the base64 of
    the value's four big-endian bytes."""

    def __init__(self) -> None:
        self.value = 0
        self._crc32c = crc32c_function()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.value = self._crc32c(data, self.value)

    def b64(self) -> str:
        return base64.b64encode(self.value.to_bytes(4, "big")).decode()


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...


class Both:
    """Feeds one read to two hashes: the file's SHA-256 and a part's CRC32C."""

    def __init__(self, first: Hasher, second: Hasher) -> None:
        self.first, self.second = first, second

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.first.update(data)
        self.second.update(data)


def hash_range(fd: int, offset: int, length: int, sha: Any, buf: bytearray | memoryview | None = None) -> int:
    """Hash [offset, offset + length) of the file open as fd into sha, read at its offsets (the fd's own position is
    neither used nor moved) through buf (reused: no allocation per block). Returns the bytes hashed: fewer than
    length only when the file ends first."""
    done = 0
    with memoryview(buf if buf is not None else bytearray(HASH_BLOCK)) as view:
        while done < length:
            n = os.preadv(fd, [view[: min(len(view), length - done)]], offset + done)
            if not n:
                break
            sha.update(view[:n])
            done += n
    return done


class FilePart:
    """A request body that is one part of a local file, read from the file as the HTTP stack sends it, block by
    block through one reused buffer: no part-sized buffer (a fresh 64 MiB one costs a page fault per 4 KiB) and no
    copy of it. Seekable, so a retried request sends the part again from its start. Hashes what it sends: `sha256()`
    is the SHA-256 of the bytes of the last pass over the whole part (read again from the file if the HTTP stack did
    not send it whole, in order). With `hashed=False` it only sends (the file's chaining values are the parts'
    checks)."""

    def __init__(self, fd: int, offset: int, length: int, name: str, hashed: bool = True) -> None:
        self._fd, self._offset, self._length, self._name = fd, offset, length, name
        self._pos = 0
        self._block = bytearray()
        self._sha = hashlib.sha256()
        # bytes [0, _hashed) of the part are in _sha, in order; -1: not hashing
        self._hashed = 0 if hashed else -1

    def __len__(self) -> int:
        return self._length - self._pos

    def read(self, n: int | None = -1) -> memoryview:
        """The next n bytes, as a view that stays valid until the next read (the HTTP stack sends each block before
        it reads the next)."""
        left = self._length - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if len(self._block) < n:
            self._block = bytearray(n)
        view = memoryview(self._block)[:n]
        got = 0
        while got < n:
            r = os.preadv(self._fd, [view[got:]], self._offset + self._pos + got)
            if not r:
                raise OSError(f"'{self._name}' ended at {self._offset + self._pos + got} bytes while uploading it")
            got += r
        if self._pos == self._hashed:
            self._sha.update(view)
            self._hashed += n
        self._pos += n
        return view

    def sha256(self) -> str:
        if self._hashed < 0:
            raise ValueError("this part was sent without hashing it")
        if self._hashed == self._length:
            return self._sha.hexdigest()
        sha = hashlib.sha256()
        if hash_range(self._fd, self._offset, self._length, sha) != self._length:
            raise OSError(f"'{self._name}' ended before {self._offset + self._length} bytes while uploading it")
        return sha.hexdigest()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + offset))
        if self._pos == 0 and self._hashed > 0:
            self._sha, self._hashed = hashlib.sha256(), 0
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


# fallocate(2) answers these where the file system cannot allocate blocks ahead (NFS before 4.2, some FUSE file
# systems), or a seccomp profile denies the call (EPERM, EACCES): the file is then made sparse, as before
# preallocation (a file that truly may not be written fails there, or at its first write). glibc's posix_fallocate
# (os.posix_fallocate) is not used: on such a file system it writes a byte into every 4 KiB block instead, 17 million
# writes for 70 GB.
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EACCES})


@functools.cache
def _fallocate() -> Any:
    """libc's fallocate(2) wrapper, or None where there is none (not Linux, or a libc without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


def free_bytes(fd: int) -> int:
    """What an unprivileged writer may still use on the open file's file system (statvfs: f_bavail)."""
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def preallocate(fd: int, size: int) -> bool:
    """Make the open, empty file `size` bytes long with its blocks allocated now (fallocate(2), mode 0), so the
    streams writing into it later find them in place instead of each allocating under the file's lock; a file
    system that cannot allocate ahead gets a sparse file of that size. True if the blocks were allocated.

    A disk without room for the whole file fails here (OSError ENOSPC, or EDQUOT over a quota), before a byte is
    fetched. One that reports room for it but still answers ENOSPC gets the sparse file: OpenZFS imitates the call
    and refuses it unless 110 % of the size is free (zfs_fallocate_reserve_percent in openzfs/zfs
    module/os/linux/zfs/zpl_file.c), and a download that fits there must not fail for it."""
    fn = _fallocate()
    if fn is not None and size > 0:
        while fn(fd, 0, 0, size) != 0:
            err = ctypes.get_errno()
            if err in _NO_FALLOCATE or (err == errno.ENOSPC and free_bytes(fd) >= size):
                break
            if err != errno.EINTR:  # a signal during a large allocation: ask again
                raise OSError(err, os.strerror(err))
        else:
            return True
    os.ftruncate(fd, size)
    return False


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        hash_range(f.fileno(), 0, os.fstat(f.fileno()).st_size, sha)
    return sha.hexdigest()


def already_present(job: FileJob) -> bool:
    if job.sha256 is None:
        return False
    try:
        if job.dest.stat().st_size != job.size:
            return False
    except FileNotFoundError:
        return False
    return file_sha256(job.dest) == job.sha256
