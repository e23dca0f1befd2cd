"""The node-local engine cache: verified engine copies in a hostPath directory that serving pods on one node share.

`serve-engine download --cache-dir DIR` asks `EngineCache.provide` for an engine. On a hit the pod's engine
directory (an emptyDir) gets symbolic links into the shared copy and nothing is fetched; on a miss the engine is
downloaded (and fully SHA-256 verified) into a private directory under the cache, sealed, and renamed into place,
so no other pod ever sees a torn copy. Layout under DIR:

    engines/<digest>/         complete copies: the engine files, manifest.json, .llmengine-verified.json
    leases/<digest>/<id>      one per pod using a copy (see `in_use`)
    locks/<digest>.lock       flock: one fetch of an engine at a time on the node; the others wait, then hit
    tmp/<digest>.<id>/        fetches in progress (with <digest>.<id>.size, the bytes they reserve)
    trash/                    copies being removed
    .lock                     flock: held while space is counted, reserved and freed

The directory must be on a local file system (flock and rename semantics; not NFS). docs/store.md explains the
choices: the verification rule, the LRU budget and what keeps a copy in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmengine.api.artifacts import Manifest
from llmengine.clients.store import MANIFEST_NAME
from llmengine.logging import get_logger

VERIFIED_NAME = ".llmengine-verified.json"
LEASE_LINK = ".llmengine-lease"
Verify = Literal["stat", "sha256"]
# A lease nobody holds (no pod's emptyDir links it, no server locks it) still counts this long after it was taken:
# it covers the moments between the init container and the server, and a server container restarting in a crash
# loop on a node where the emptyDir is on another file system than the cache (no hard link possible).
DEFAULT_LEASE_GRACE_S = 3600.0
GiB = 1024**3


class CacheUnavailable(Exception):
    """The cache directory cannot be used (missing, not writable by this uid); the pod fetches without it."""


@dataclass(frozen=True)
class CacheSettings:
    root: Path
    budget_bytes: int
    verify: Verify = "stat"
    lease_grace_s: float = DEFAULT_LEASE_GRACE_S


@dataclass(frozen=True)
class Outcome:
    """What `provide` did: `hit` (nothing fetched), or fetched `fetched_bytes` into the cache (`cached`) or, when
    the cache could not take the engine, straight into the pod's directory."""

    hit: bool
    cached: bool
    fetched_bytes: int
    reason: str
    copy: Path | None = None


@contextlib.contextmanager
def flocked(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_locked(path: Path) -> bool:
    """Whether another open file holds a flock on `path` (a fetch or a running server)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 * 1024 * 1024):
            sha.update(chunk)
    return sha.hexdigest()


def engine_paths(manifest: Manifest) -> list[str]:
    return [f.path for f in manifest.files] + [MANIFEST_NAME]


def seal(copy: Path, manifest: Manifest) -> None:
    """Make a fully verified copy read-only and write its verification record: the size and mtime of every file as
    they were when its SHA-256 matched the manifest. The stat rule trusts a copy whose files still match it."""
    record: dict[str, list[int]] = {}
    for rel in engine_paths(manifest):
        p = copy / rel
        os.chmod(p, 0o444)
        st = os.stat(p)
        record[rel] = [st.st_size, st.st_mtime_ns]
    doc = {"engineDigest": manifest.engine_digest, "files": record, "bytes": manifest.total_bytes}
    (copy / VERIFIED_NAME).write_text(json.dumps(doc, sort_keys=True))


def check(copy: Path, digest: str, verify: Verify) -> str | None:
    """Why a cached copy cannot be served (None: it can). "stat": each file's size and mtime match the record
    written after its full verification; "sha256": each file hashes to the manifest's SHA-256 (reads every byte)."""
    try:
        record = json.loads((copy / VERIFIED_NAME).read_text())
        manifest = Manifest.model_validate_json((copy / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError) as exc:
        return f"no valid verification record or manifest ({type(exc).__name__}): an interrupted or foreign copy"
    if manifest.engine_digest != digest or record.get("engineDigest") != digest:
        return f"it holds engine {manifest.engine_digest}"
    files: dict[str, list[int]] = record.get("files") or {}
    sizes = {f.path: f.size for f in manifest.files}
    for rel in engine_paths(manifest):
        p = copy / rel
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return f"'{rel}' is missing"
        if not p.is_file() or p.is_symlink():
            return f"'{rel}' is not a regular file"
        if rel in sizes and st.st_size != sizes[rel]:
            return f"'{rel}' is {st.st_size} bytes, the manifest says {sizes[rel]}"
        if [st.st_size, st.st_mtime_ns] != files.get(rel):
            return f"'{rel}' changed after it was verified (size or mtime differs from the record)"
    if verify == "sha256":
        for f in manifest.files:
            if sha256_of(copy / f.path) != f.sha256:
                return f"'{f.path}' does not match the manifest's SHA-256 (corrupted)"
    return None


def clear_links(dest: Path) -> None:
    """Remove what an earlier run of this init container left in the pod's directory: links into the cache."""
    if not dest.is_dir():
        return
    for p in sorted(dest.rglob("*"), reverse=True):
        if p.is_symlink() or p.name == LEASE_LINK:
            p.unlink()


class EngineCache:
    def __init__(self, settings: CacheSettings, clock: Callable[[], float] = time.time) -> None:
        self.s = settings
        self.clock = clock
        root = settings.root
        self.engines, self.leases, self.locks = root / "engines", root / "leases", root / "locks"
        self.tmp, self.trash = root / "tmp", root / "trash"
        self.log = get_logger(component="engine-cache", root=str(root))

    def copy_of(self, digest: str) -> Path:
        return self.engines / digest

    def _lock_path(self, digest: str) -> Path:
        return self.locks / f"{digest}.lock"

    def _prepare(self) -> None:
        try:
            for d in (self.engines, self.leases, self.locks, self.tmp, self.trash):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.tmp / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)  # another fetch's sweep may have taken it
        except OSError as exc:
            raise CacheUnavailable(
                f"engine cache {self.s.root} is not usable by uid {os.getuid()} ({exc.strerror or exc}): "
                "create it owned by that uid on the node (docs/store.md)"
            ) from exc

    # -- the one entry point -----------------------------------------------------------------------------------

    def provide(
        self, digest: str, dest: Path, size_of: Callable[[], int], fetch: Callable[[Path], Manifest]
    ) -> Outcome:
        """The engine in `dest`: links to a verified shared copy (fetched first if the node has none).

        `size_of` gives the engine's bytes (asked only on a miss, to make room before fetching); `fetch(dir)`
        downloads and fully verifies the engine into an empty directory and returns its manifest. When the cache
        cannot hold the engine (bigger than the budget, or copies in use fill it) or cannot be used at all, the
        engine is fetched into `dest` itself, as without a cache.
        """
        clear_links(dest)
        try:
            self._prepare()
        except CacheUnavailable as exc:
            return self._direct(dest, fetch, str(exc))
        with flocked(self._lock_path(digest)):
            copy = self.copy_of(digest)
            if copy.exists():
                problem = check(copy, digest, self.s.verify)
                if problem is None:
                    self._use(copy, dest)
                    return Outcome(
                        hit=True, cached=True, fetched_bytes=0, reason="verified copy on the node", copy=copy
                    )
                self.log.warning("cached copy fails verification; fetching it again", digest=digest, problem=problem)
                self._discard(copy)
            size = size_of()
            tmp = self._reserve(digest, size)
            if tmp is None:
                why = f"the cache cannot make room for {size} bytes (budget {self.s.budget_bytes}, the rest in use)"
                return self._direct(dest, fetch, why)
            try:
                manifest = fetch(tmp)
                seal(tmp, manifest)
                os.rename(tmp, copy)  # the commit point: a copy is complete and verified, or absent
            finally:
                self._release(tmp)
            self._use(copy, dest)
            return Outcome(hit=False, cached=True, fetched_bytes=manifest.total_bytes, reason="fetched", copy=copy)

    def _direct(self, dest: Path, fetch: Callable[[Path], Manifest], why: str) -> Outcome:
        self.log.warning("fetching into the pod, not the node's cache", reason=why)
        manifest = fetch(dest)
        return Outcome(hit=False, cached=False, fetched_bytes=manifest.total_bytes, reason=why)

    def _use(self, copy: Path, dest: Path) -> None:
        """Take a lease on the copy and link its files into the pod's directory; mark it used now (LRU)."""
        manifest = Manifest.model_validate_json((copy / MANIFEST_NAME).read_bytes())
        now = self.clock()
        os.utime(copy, (now, now))
        leases = self.leases / copy.name
        leases.mkdir(parents=True, exist_ok=True)
        lease = leases / uuid.uuid4().hex
        lease.write_text(json.dumps({"takenAt": now, "dest": str(dest)}))
        os.utime(lease, (now, now))
        dest.mkdir(parents=True, exist_ok=True)
        try:
            # A hard link in the pod's emptyDir keeps the lease's link count above 1 for exactly the pod's life.
            os.link(lease, dest / LEASE_LINK)
        except OSError:
            os.symlink(lease, dest / LEASE_LINK)  # another file system: the server's flock and the grace remain
        for rel in engine_paths(manifest):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).unlink(missing_ok=True)  # an earlier run that fetched into the pod left its own file
            os.symlink(copy / rel, dest / rel)

    # -- room --------------------------------------------------------------------------------------------------

    def _reserve(self, digest: str, size: int) -> Path | None:
        """Free space for `size` bytes (least recently used copies first, never one in use) and reserve it: a fetch
        directory whose size file other fetchers count. None when the budget cannot take it."""
        if size > self.s.budget_bytes:
            return None
        with flocked(self.s.root / ".lock"):
            self._sweep(digest)
            used = sum(tree_bytes(p) for p in self.engines.iterdir()) + self._reserved()
            for copy in self._lru():
                if used + size <= self.s.budget_bytes:
                    break
                if copy.name != digest and not self.in_use(copy.name):
                    used -= tree_bytes(copy)
                    self.log.info("evicting least recently used copy", digest=copy.name)
                    self._discard(copy)
            if used + size > self.s.budget_bytes:
                return None
            tmp = self.tmp / f"{digest}.{uuid.uuid4().hex[:12]}"
            tmp.mkdir()
            tmp.with_name(tmp.name + ".size").write_text(str(size))
            return tmp

    def _release(self, tmp: Path) -> None:
        tmp.with_name(tmp.name + ".size").unlink(missing_ok=True)
        if tmp.exists():
            self._discard(tmp)

    def _reserved(self) -> int:
        total = 0
        for p in self.tmp.glob("*.size"):
            with contextlib.suppress(OSError, ValueError):
                total += int(p.read_text())
        return total

    def _lru(self) -> list[Path]:
        copies = [p for p in self.engines.iterdir() if p.is_dir()]
        return sorted(copies, key=lambda p: p.stat().st_mtime)

    def _sweep(self, fetching: str) -> None:
        """Remove what crashed fetches and evictions left: fetch directories whose engine no fetch holds (ours is
        held by this process, and has none yet), and the trash."""
        for p in self.tmp.iterdir():
            digest = p.name.split(".", 1)[0]
            if digest == fetching or not is_locked(self._lock_path(digest)):
                if p.is_dir():
                    self._discard(p)
                else:
                    p.unlink(missing_ok=True)
        for p in self.trash.iterdir():
            shutil.rmtree(p, ignore_errors=True)

    def in_use(self, digest: str) -> bool:
        """Whether a pod may be using the copy: a fetch or hit holds its lock now, or one of its leases is live.

        A lease is live while a pod's emptyDir hard-links it (link count above 1: kubelet removes the emptyDir with
        the pod), while a server holds a shared flock on it, or within the grace after it was taken. Other leases
        belong to pods that are gone: they are removed here.
        """
        if is_locked(self._lock_path(digest)):
            return True
        live = False
        leases = self.leases / digest
        for lease in leases.iterdir() if leases.is_dir() else ():
            st = lease.stat()
            if st.st_nlink > 1 or is_locked(lease) or self.clock() - st.st_mtime < self.s.lease_grace_s:
                live = True
            else:
                lease.unlink(missing_ok=True)
        return live

    def _discard(self, path: Path) -> None:
        """Remove a copy or fetch directory: renamed away first, so it is gone from its name at once."""
        gone = self.trash / f"{path.name}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)


def hold_lease(engine_dir: Path) -> int | None:
    """The server's shared flock on its lease (when its engine dir links a cached copy), kept for its whole life and
    across exec into trtllm-serve: while it is held, no fetch on the node evicts the copy. Returns the fd."""
    link = engine_dir / LEASE_LINK
    try:
        fd = os.open(link, os.O_RDONLY)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.set_inheritable(fd, True)
    return fd
