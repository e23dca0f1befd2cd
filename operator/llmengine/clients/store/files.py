"""Local files of a transfer: a download's job per file, its byte ranges, hashing, whether it is already in place;
an upload's parts read into reused buffers."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmengine.clients.store.layout import PARTIAL_SUFFIX, MiB


@dataclass
class FileJob:
    key: str
    dest: Path
    size: int
    sha256: str | None
    name: str
    url: str | None = None  # a presigned GET URL (an engine grant) to read instead of the key

    @property
    def partial(self) -> Path:
        return self.dest.with_name(self.dest.name + PARTIAL_SUFFIX)


def byte_ranges(size: int, part: int) -> list[tuple[int, int]]:
    if size == 0 or part <= 0:
        return [(0, size)]
    return [(off, min(part, size - off)) for off in range(0, size, part)]


def hash_range(f: io.RawIOBase, offset: int, length: int, sha: Any, buf: bytearray) -> None:
    """Hash [offset, offset + length) of f into sha, read through buf (reused: no allocation per block)."""
    f.seek(offset)
    left = length
    with memoryview(buf) as view:
        while left:
            n = f.readinto(view[: min(len(view), left)])
            if not n:
                break
            sha.update(view[:n])
            left -= n


def read_into(f: io.RawIOBase, buf: bytearray) -> int:
    """Fill buf from f; fewer bytes than its length only at the end of the file. Returns the bytes read."""
    got = 0
    with memoryview(buf) as view:
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return got


class PartBody:
    """A request body over a reused buffer, without copying it: a bytearray body is copied into fresh bytes by the
    HTTP stack (a page fault per 4 KiB of every part); a file-like one is read in blocks, and these blocks are views
    of the buffer. Seekable, so a retried request sends it again from the start."""

    def __init__(self, data: memoryview) -> None:
        self._data, self._pos = data, 0

    def __len__(self) -> int:
        return len(self._data) - self._pos

    def read(self, n: int | None = -1) -> memoryview:
        end = len(self._data) if n is None or n < 0 else min(len(self._data), self._pos + n)
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, min(len(self._data), base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def file_sha256(path: Path, block: int = 8 * MiB) -> str:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(block):
            sha.update(data)
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
