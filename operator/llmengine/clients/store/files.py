"""Local files of a download: one file's job, its byte ranges, hashing, and whether it is already in place."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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


def hash_range(f: IO[bytes], offset: int, length: int, sha: Any, block: int = 8 * MiB) -> None:
    f.seek(offset)
    left = length
    while left:
        data = f.read(min(block, left))
        if not data:
            break
        sha.update(data)
        left -= len(data)


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
