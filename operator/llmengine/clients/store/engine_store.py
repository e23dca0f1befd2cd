"""The engine store: engines under one StoreLocation, uploaded, committed, downloaded and verified."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar, cast

from botocore import exceptions as bx
from pydantic import ValidationError

from llmengine.api.artifacts import (
    BuildProgress,
    BuildResult,
    BuildShapes,
    EngineGrant,
    GrantedEngine,
    Manifest,
    ManifestFile,
    Provenance,
    StoreLocation,
    first_problem,
)
from llmengine.clients.store import chain, urls
from llmengine.clients.store.client import S3Client, S3Config, TransferTuning, make_s3_client
from llmengine.clients.store.errors import (
    CHECKSUM_MISMATCH,
    SETTING_PART_CHECKSUM,
    SPEC_STORE,
    IntegrityError,
    ManifestInvalid,
    StoreError,
    StoreSettings,
    error_code,
    error_message,
    refuses_checksums,
    translate_error,
)
from llmengine.clients.store.files import (
    HASH_BLOCK,
    Both,
    Crc32c,
    FileJob,
    FilePart,
    RangeCheck,
    already_present,
    byte_ranges,
    crc32c_function,
    free_bytes,
    hash_range,
    preallocate,
    range_checks,
)
from llmengine.clients.store.layout import (
    BUILDS_DIR,
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    PROGRESS_NAME,
    QUARANTINE_DIR,
    RESERVED_NAMES,
    RESULT_NAME,
    SHA256_BLOCK,
    build_prefix,
    check_files_prefix,
    check_manifest_paths,
    local_files,
    new_build_id,
)
from llmengine.clients.store.progress import Progress
from llmengine.clients.store.receive import close, receive
from llmengine.clients.store.retry import Patience
from llmengine.clock import iso, utcnow
from llmengine.logging import get_logger

T = TypeVar("T")


def _note_failure(failed: threading.Event, fut: Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        failed.set()


@dataclass(frozen=True)
class PartUpload:
    """One part of a multipart upload: where it is in the file, and the checksum fields its request carries (the CRC32C
    of its bytes, when the store checks it)."""

    name: str
    fd: int
    key: str
    upload_id: str
    number: int
    offset: int
    length: int
    checks: dict[str, Any]


def _checksum_fields(crc: Crc32c | None) -> dict[str, Any]:
    return {"ChecksumCRC32C": crc.b64()} if crc is not None else {}


class EngineStore:
    """Engines under one StoreLocation. Stateless apart from the client: safe to share across threads."""

    def __init__(
        self,
        client: S3Client,
        location: StoreLocation,
        tuning: TransferTuning | None = None,
        names: StoreSettings = SPEC_STORE,
    ) -> None:
        self.client = client
        self.location = location
        self.tuning = tuning or TransferTuning()
        self.names = names  # how errors name the settings to fix
        self._unconfirmed_noted = False  # a store that does not confirm part checksums is logged once

    # -- naming ---------------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def key(self, digest: str, name: str) -> str:
        return self.location.engine_prefix(digest) + name

    def file_key(self, manifest: Manifest, path: str) -> str:
        """The key of one file of a committed engine (under the directory of the build that committed it)."""
        return self.key(manifest.engine_digest, manifest.files_prefix + path)

    def uri(self, digest: str) -> str:
        return self.location.engine_uri(digest)

    @contextlib.contextmanager
    def _s3(self) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.endpoint, self.location.bucket, self.names) from exc

    def _patience(self, what: str) -> Patience:
        return Patience(self.tuning.retry_seconds, what, get_logger(stage="s3"))

    def _patient(self, what: str, fn: Callable[[], T]) -> T:
        """fn(), attempted again while the store is unreachable, within the retry budget."""
        patience = self._patience(what)
        while True:
            try:
                return fn()
            except Exception as exc:
                patience.wait_or_raise(exc, self.endpoint)

    # -- reading the commit record --------------------------------------------------------------------------------

    def _get_json(self, digest: str, name: str) -> bytes | None:
        def get() -> bytes | None:
            try:
                obj = self.client.get_object(Bucket=self.location.bucket, Key=self.key(digest, name))
            except Exception as exc:
                if error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            body: bytes = obj["Body"].read()
            return body

        with self._s3():
            return self._patient(f"get {name}", get)

    def get_manifest(self, digest: str) -> Manifest | None:
        """The engine's manifest, or None when it is not committed. A manifest that does not parse raises."""
        raw = self._get_json(digest, MANIFEST_NAME)
        if raw is None:
            return None
        where = self.uri(digest) + MANIFEST_NAME
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise ManifestInvalid(
                f"manifest at {where} is malformed ({first_problem(exc)}); rebuild the engine"
            ) from exc
        if manifest.engine_digest != digest:
            raise IntegrityError(f"manifest at {where} is for engine {manifest.engine_digest}, not {digest}")
        check_files_prefix(manifest.files_prefix)
        return manifest

    def is_committed(self, digest: str) -> bool:
        return self.get_manifest(digest) is not None

    def get_result(self, digest: str, files_prefix: str = "") -> BuildResult | None:
        """A build's result: the committing build's under its directory (the manifest's files_prefix), a failed
        build's at the top."""
        raw = self._get_json(digest, files_prefix + RESULT_NAME)
        if raw is None:
            return None
        try:
            return BuildResult.model_validate_json(raw)
        except ValidationError as exc:
            raise StoreError(
                f"build result at {self.uri(digest)}{RESULT_NAME} is malformed ({first_problem(exc)})"
            ) from exc

    def _put_bytes(self, digest: str, name: str, body: bytes) -> None:
        with self._s3():
            self._patient(
                f"put {name}",
                lambda: self.client.put_object(
                    Bucket=self.location.bucket, Key=self.key(digest, name), Body=body, ContentType="application/json"
                ),
            )

    def put_result(self, digest: str, result: BuildResult, files_prefix: str = "") -> None:
        self._put_bytes(digest, files_prefix + RESULT_NAME, result.to_json().encode())

    def put_progress(self, progress: BuildProgress) -> None:
        """One try, no patience: a note on where a build is must never hold the build up."""
        key = self.key(progress.engine_digest, PROGRESS_NAME)
        body = progress.to_json().encode()
        with self._s3():
            self.client.put_object(Bucket=self.location.bucket, Key=key, Body=body, ContentType="application/json")

    def get_progress(self, digest: str) -> BuildProgress | None:
        """Where the running build of `digest` is; None when no builder said, or what it wrote does not parse."""
        raw = self._get_json(digest, PROGRESS_NAME)
        if raw is None:
            return None
        try:
            return BuildProgress.model_validate_json(raw)
        except ValidationError:
            return None

    def list_objects(self, prefix: str) -> dict[str, int]:
        """key -> size for every object under the prefix."""

        def listing() -> dict[str, int]:
            out: dict[str, int] = {}
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out[obj["Key"]] = int(obj["Size"])
            return out

        with self._s3():
            return self._patient("list", listing)

    # -- upload ----------------------------------------------------------------------------------------------------

    def upload_file(
        self, local: Path, key: str, progress: Progress | None = None, path: str | None = None
    ) -> ManifestFile:
        """Upload one file; returns its manifest entry under `path` (default: the file's name).

        Files above the part size go up as a multipart upload: this thread hashes the whole file in order (no part is
        held in memory), noting the SHA-256 chaining value at the end of every part, which downloads verify part by
        part (`partStates`), and hands each part to a pool of `concurrency` senders once its bytes are hashed, with
        the part's CRC32C from the same read; each part is read from the file again as it is sent, and the store
        checks it against that CRC32C (`part_checksum`, docs/store.md "Part checksums"). Where chaining values are
        not available (chain.AVAILABLE), each part is also hashed on its own as it is sent (`partSha256`: every
        byte hashed twice). Each part (and the single PUT of a small file) is retried on its own while the store is
        unreachable, within the retry budget: an outage costs the parts in flight, not the file. A file that
        changes while uploading (its size, or its modification time or inode after the upload) fails the upload,
        so the whole file's digest and the parts' checks always describe the same bytes.
        """
        before = local.stat()
        size = before.st_size
        prog = progress or Progress(get_logger(), "upload", size, self.tuning.progress_interval_s)
        bucket = self.location.bucket
        # S3 allows 10,000 parts: grow the part for files that would need more (in whole SHA-256 blocks).
        part = max(self.tuning.part_size, -(-size // 10_000))
        part = -(-part // SHA256_BLOCK) * SHA256_BLOCK
        entry = ManifestFile(path=path or local.name, sha256="", size=size)
        self.check_upload_settings()  # before anything goes up
        with self._s3(), open(local, "rb", buffering=0) as f:
            if size <= part:
                data = f.read()
                crc = self._crc32c()
                if crc is not None:
                    crc.update(data)
                checks = _checksum_fields(crc)
                self._patient(
                    f"upload {local.name}",
                    lambda: self._checked(
                        entry.path, checks, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data, **checks)
                    ),
                )
                prog.add(len(data))
                entry = entry.model_copy(update={"sha256": hashlib.sha256(data).hexdigest()})
            else:
                entry = self._multipart(entry, f.fileno(), key, part, prog)
        after = local.stat()
        if (after.st_size, after.st_mtime_ns, after.st_ino) != (size, before.st_mtime_ns, before.st_ino):
            raise StoreError(f"{local} changed while uploading ({size} bytes when it started, {after.st_size} now)")
        return entry

    def _multipart(self, entry: ManifestFile, fd: int, key: str, part: int, prog: Progress) -> ManifestFile:
        """This thread hashes the file in order and hands each part to the pool once its bytes are hashed, with the
        CRC32C taken in the same read, which the store checks as the part lands; returns the file's entry with its
        SHA-256 and its parts' checks. A file whose size changed meanwhile is not completed (the upload is
        aborted)."""
        name, size = entry.path, entry.size
        bucket = self.location.bucket
        chained = chain.AVAILABLE
        named: dict[str, Any] = {"ChecksumAlgorithm": "CRC32C"} if self.tuning.part_checksum == "crc32c" else {}
        started = self._patient(
            f"upload {name}",
            lambda: self._checked(
                name, {}, lambda: self.client.create_multipart_upload(Bucket=bucket, Key=key, **named)
            ),
        )
        upload_id = started["UploadId"]
        futs: list[Future[tuple[dict[str, Any], str | None]]] = []
        try:
            conc = max(1, self.tuning.concurrency)
            with ThreadPoolExecutor(max_workers=conc, thread_name_prefix="s3put") as pool:
                try:
                    sha: Any = chain.ChainedSha256() if chained else hashlib.sha256()
                    states: list[str] = []
                    buf = bytearray(HASH_BLOCK)
                    failed = threading.Event()  # a part failed: stop hashing, its error is raised below
                    for number, (off, ln) in enumerate(byte_ranges(size, part), 1):
                        if failed.is_set():
                            break
                        crc = self._crc32c()
                        if hash_range(fd, off, ln, Both(sha, crc) if crc else sha, buf) != ln:
                            raise StoreError(f"{name} changed size while uploading (it ended before {off + ln} bytes)")
                        if chained and off + ln < size:
                            states.append(sha.state())
                        sent = PartUpload(name, fd, key, upload_id, number, off, ln, _checksum_fields(crc))
                        futs.append(pool.submit(self._put_part, sent, prog, not chained))
                        futs[-1].add_done_callback(functools.partial(_note_failure, failed))
                    # The first part to fail fails the file at once (the parts queued behind it are cancelled).
                    finished, _ = wait(futs, return_when=FIRST_EXCEPTION)
                    for fut in finished:
                        fut.result()
                    done = [fut.result() for fut in futs]
                except BaseException:
                    for fut in futs:
                        fut.cancel()  # parts not started yet would each wait out a budget of their own
                    raise
            now = os.fstat(fd).st_size
            if now != size:
                raise StoreError(f"{name} changed size while uploading ({size} -> {now} bytes)")
            self._patient(f"upload {name}", lambda: self._complete(key, upload_id, [p for p, _ in done], size))
        except BaseException:
            with contextlib.suppress(Exception):
                self._patient(
                    f"abort upload of {name}",
                    lambda: self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id),
                )
            raise
        checks: dict[str, Any] = (
            {"part_states": states} if chained else {"part_sha256": [d for _, d in done if d is not None]}
        )
        return entry.model_copy(update={"sha256": sha.hexdigest(), "part_size": part, **checks})

    def _complete(self, key: str, upload_id: str, parts: list[Any], size: int) -> None:
        bucket = self.location.bucket
        try:
            self.client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except bx.ClientError as exc:
            # A completion whose response was lost, retried: the upload is gone because the object is complete.
            if error_code(exc) != "NoSuchUpload":
                raise
            head = self.client.head_object(Bucket=bucket, Key=key)
            if int(head.get("ContentLength") or -1) != size:
                raise

    def _put_part(self, up: PartUpload, prog: Progress, hashed: bool) -> tuple[dict[str, Any], str | None]:
        """One part; returns its entry for the completion and, when `hashed`, the SHA-256 of the bytes the accepted
        request sent."""
        sent: list[FilePart] = []

        def put() -> Any:
            body = FilePart(up.fd, up.offset, up.length, up.name, hashed)
            sent.append(body)
            # file-like, as botocore takes it (not in its stubs)
            return self.client.upload_part(
                Bucket=self.location.bucket,
                Key=up.key,
                UploadId=up.upload_id,
                PartNumber=up.number,
                Body=cast(Any, body),
                **up.checks,
            )

        what = f"part {up.number} of {up.name}"
        got = self._patient(f"upload {up.name} part {up.number}", lambda: self._checked(what, up.checks, put))
        prog.add(up.length)
        return {"PartNumber": up.number, "ETag": got["ETag"], **up.checks}, sent[-1].sha256() if hashed else None

    def check_upload_settings(self) -> None:
        """A StoreError naming the fix where uploads cannot run as set: CRC32C part checksums without awscrt. The
        builder asks before it builds, so that a setting costs no GPU time."""
        if self.tuning.part_checksum == "crc32c":
            crc32c_function()

    def _crc32c(self) -> Crc32c | None:
        return Crc32c() if self.tuning.part_checksum == "crc32c" else None

    def _checked(self, what: str, checks: dict[str, Any], send: Callable[[], T]) -> T:
        """send(): a request carrying `checks` (x-amz-checksum-crc32c), or naming the algorithm. Sent once more if
        the store finds the bytes it received different from the checksum (a body changed on the way); the store's
        answer must repeat the checksum sent (a store that ignores it is noted once in the log). A StoreError naming
        the fix when the bytes arrive changed twice, or when the store refuses CRC32C checksums."""
        try:
            got = send()
        except bx.ClientError as exc:
            if error_code(exc) not in CHECKSUM_MISMATCH:
                self._explain(what, exc)
                raise
            try:
                got = send()  # read from the file again
            except bx.ClientError as again:
                self._explain(what, again)
                raise
        if "ChecksumCRC32C" in checks:
            echo = cast(dict[str, Any], got).get("ChecksumCRC32C")
            if echo is None and not self._unconfirmed_noted:
                self._unconfirmed_noted = True
                get_logger().warning(
                    "the store does not confirm CRC32C part checksums: it may not check them (every download still "
                    "verifies the SHA-256)",
                    endpoint=self.endpoint,
                    first=what,
                )
            elif echo is not None and echo != checks["ChecksumCRC32C"]:
                raise StoreError(
                    f"the store took {what} with CRC32C {echo}, not the {checks['ChecksumCRC32C']} sent: it computes "
                    f"another checksum; set {SETTING_PART_CHECKSUM}=none on the build pods",
                    setting=SETTING_PART_CHECKSUM,
                )
        return got

    def _explain(self, what: str, exc: bx.ClientError) -> None:
        """Raise the store's refusal of a checksummed request as a StoreError naming the fix, where there is one."""
        code = error_code(exc)
        if code in CHECKSUM_MISMATCH:
            raise StoreError(
                f"{what} reached the store different from the bytes hashed for the manifest, twice ({code}): the file "
                "changed while uploading, or the path to the store changes data (use an https endpoint); nothing of "
                "it is committed"
            ) from exc
        if self.tuning.part_checksum == "crc32c" and refuses_checksums(exc):
            raise StoreError(
                f"the store refused the CRC32C checksum of {what} ({code}: {error_message(exc)}); for a store without "
                f"CRC32C checksums set {SETTING_PART_CHECKSUM}=none on the build pods",
                setting=SETTING_PART_CHECKSUM,
            ) from exc

    def upload_engine(
        self,
        digest: str,
        local_dir: Path,
        *,
        backend: Literal["tensorrt", "pytorch"],
        tp_size: int,
        pp_size: int,
        shapes: BuildShapes,
        provenance: Provenance,
        result: BuildResult | None = None,
        build_id: str | None = None,
    ) -> Manifest:
        """Upload an engine directory into a build directory of its own, then its build result, then commit: the
        manifest, written only if no build committed the engine first. Returns the committed manifest, which is
        another build's when that one won (our files are then removed: nobody references them).

        A crash before the commit leaves no manifest, so the engine stays uncommitted and a retry uploads afresh; a
        second build racing this one (another namespace, another cluster on the same bucket) writes only under its
        own directory, so a committed engine's files are never touched.
        """
        build_id = build_id or new_build_id()
        base = build_prefix(build_id)
        log = get_logger(engine_digest=digest, stage="upload", build_id=build_id)
        files = local_files(local_dir)
        if not files:
            raise StoreError(f"nothing to upload: {local_dir} has no files")
        total = sum(p.stat().st_size for _, p in files)
        prog = Progress(log, "upload", total, self.tuning.progress_interval_s)
        log.info("upload started", uri=self.uri(digest) + base, files=len(files), total_bytes=total)
        entries: list[ManifestFile] = []
        for rel, path in files:
            entries.append(self.upload_file(path, self.key(digest, base + rel), prog, rel))
        self._check_uploaded(digest, base, entries)
        manifest = Manifest(
            engine_digest=digest,
            backend=backend,
            tp_size=tp_size,
            pp_size=pp_size,
            shapes=shapes,
            files=entries,
            provenance=provenance,
            files_prefix=base,
            build_id=build_id,
        )
        if result is not None:
            self.put_result(digest, result, base)
        committed = self._commit(manifest, log)
        if committed.build_id != build_id:
            log.info("another build committed this engine first; keeping it", winner=committed.build_id)
            self._delete_prefix(self.key(digest, base))
            return committed
        log.info("upload committed", uri=self.uri(digest), files=len(entries), **prog.summary())
        return manifest

    def _commit(self, manifest: Manifest, log: Any) -> Manifest:
        """Write the manifest unless one is there; the manifest that stands afterwards.

        The write is conditional (If-None-Match: *), so of two builds racing, exactly one commits. A store that
        does not implement conditional writes gets a plain write after a look: two builds finishing within that
        window both write, the last one stands, and both reference complete, verified files of their own, so an
        engine is never torn (a replica that read the first manifest verifies the first build's files)."""
        digest = manifest.engine_digest
        key, body = self.key(digest, MANIFEST_NAME), manifest.to_json().encode()
        bucket = self.location.bucket
        try:
            existing = self.get_manifest(digest)
        except (ManifestInvalid, IntegrityError) as exc:
            # Not a committed engine: what stands there commits nothing. Remove it; the conditional write below
            # still lets exactly one of several builds replace it.
            log.warning("the stored manifest is broken; replacing it", error=str(exc))
            with self._s3():
                self.client.delete_object(Bucket=bucket, Key=key)
            existing = None
        if existing is not None:
            return existing

        def put(conditional: bool) -> Any:
            extra: dict[str, Any] = {"IfNoneMatch": "*"} if conditional else {}
            return self.client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **extra)

        try:
            with self._s3():
                self._patient("commit manifest.json", lambda: put(True))
        except StoreError as exc:
            cause = exc.__cause__
            code = error_code(cause) if cause is not None else ""
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                pass  # another build committed between our look and our write (or our own retried write did)
            elif code in ("NotImplemented", "NotImplementedError"):
                log.warning("the store does not implement conditional writes; committing with a plain write")
                with self._s3():
                    self._patient("commit manifest.json", lambda: put(False))
            else:
                raise
        stands = self.get_manifest(digest)
        if stands is None:
            raise StoreError(f"the manifest of engine {digest} is not readable right after it was written")
        return stands

    def _check_uploaded(self, digest: str, base: str, entries: list[ManifestFile]) -> None:
        """Read back the sizes the store reports before committing: a silently short object must not commit."""
        listed = self.list_objects(self.key(digest, base))
        for e in entries:
            got = listed.get(self.key(digest, base + e.path))
            if got != e.size:
                raise StoreError(f"after upload the store reports {got} bytes for '{e.path}', expected {e.size}")

    # -- download --------------------------------------------------------------------------------------------------

    def download_engine(self, digest: str, dest_dir: Path, parallelism: int | None = None) -> Manifest:
        """Download a committed engine into dest_dir and verify every file against the manifest.

        Raises IntegrityError (naming the file) when the manifest is missing, lists an odd or absent file, or a
        file's size or SHA-256 differs. Files already present and matching are kept (restarts are cheap).
        """
        log = get_logger(engine_digest=digest, stage="download")
        manifest = self.get_manifest(digest)
        if manifest is None:
            raise IntegrityError(
                f"engine {digest} is not committed: no {MANIFEST_NAME} at {self.uri(digest)} "
                "(the build never finished or its upload was interrupted)"
            )
        check_manifest_paths(manifest.files)
        base = manifest.files_prefix
        listed = self.list_objects(self.key(digest, base))
        for f in manifest.files:
            got = listed.get(self.key(digest, base + f.path))
            if got is None:
                raise IntegrityError(
                    f"'{f.path}' is listed in the manifest but missing from {self.uri(digest)}", f.path
                )
            if got != f.size:
                raise IntegrityError(
                    f"'{f.path}' is {got} bytes in the store but the manifest says {f.size} (truncated or replaced)",
                    f.path,
                )
        expected = {self.key(digest, base + f.path) for f in manifest.files}
        expected |= {self.key(digest, base + n) for n in RESERVED_NAMES}
        builds = self.key(digest, BUILDS_DIR)
        extra = sorted(k for k in listed if k not in expected and (base or not k.startswith(builds)))
        if extra:
            log.warning("store has objects the manifest does not list; ignoring them", objects=extra[:10])
        return self._download_verified(manifest, dest_dir, parallelism, log, None, total_bytes=manifest.total_bytes)

    def _download_verified(
        self,
        manifest: Manifest,
        dest_dir: Path,
        parallelism: int | None,
        log: Any,
        urls: dict[str, str] | None,
        **started: Any,
    ) -> Manifest:
        """Every file of the manifest into dest_dir, each checked against its size and SHA-256 (read by key, or
        through `urls` by manifest path), then the manifest itself."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        self._check_dest(dest_dir, manifest)
        prog = Progress(log, "download", manifest.total_bytes, self.tuning.progress_interval_s)
        log.info("download started", uri=self.uri(manifest.engine_digest), files=len(manifest.files), **started)
        jobs = [
            FileJob(
                key=self.file_key(manifest, f.path),
                dest=dest_dir / f.path,
                size=f.size,
                sha256=f.sha256,
                name=f.path,
                url=urls[f.path] if urls is not None else None,
                part_size=f.part_size,
                part_sha256=f.part_sha256,
                part_states=f.part_states,
            )
            for f in manifest.files
        ]
        self._download_files(jobs, parallelism or self.tuning.concurrency, prog)
        (dest_dir / MANIFEST_NAME).write_text(manifest.to_json())
        log.info("download verified", dest=str(dest_dir), files=len(jobs), **prog.summary())
        return manifest

    def download_granted(
        self, grant: EngineGrant, digest: str, dest_dir: Path, parallelism: int | None = None
    ) -> Manifest:
        """Download a committed engine through a grant's presigned URLs (no credentials, no listing) and verify every
        file against the manifest the grant carries, as download_engine does."""
        log = get_logger(engine_digest=digest, stage="download")
        entry = grant.engines.get(digest)
        if entry is None:
            raise StoreError(
                f"the engine grant has no URLs for engine {digest} (it grants "
                f"{', '.join(sorted(grant.engines)) or 'none'}): the operator writes them once the engine is committed"
            )
        manifest = entry.manifest
        check_manifest_paths(manifest.files)
        missing = [f.path for f in manifest.files if f.path not in entry.urls]
        if missing:
            raise IntegrityError(f"the engine grant has no URL for '{missing[0]}'", missing[0])
        return self._download_verified(manifest, dest_dir, parallelism, log, entry.urls, grant_expires=grant.expires_at)

    def grant(self, digest: str, expires_in: int) -> GrantedEngine:
        """Presigned GET URLs, valid `expires_in` seconds, for every file of a committed engine (signing is local:
        one manifest read, no other request)."""
        manifest = self.get_manifest(digest)
        if manifest is None:
            raise IntegrityError(f"engine {digest} is not committed: no {MANIFEST_NAME} at {self.uri(digest)}")
        with self._s3():
            signed = {
                f.path: self.client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.location.bucket, "Key": self.file_key(manifest, f.path)},
                    ExpiresIn=expires_in,
                )
                for f in manifest.files
            }
        return GrantedEngine(manifest=manifest, urls=signed)

    def _check_dest(self, dest_dir: Path, manifest: Manifest) -> None:
        wanted = {f.path for f in manifest.files} | RESERVED_NAMES
        for p in sorted(dest_dir.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(dest_dir).as_posix()
            if rel.endswith(PARTIAL_SUFFIX):
                p.unlink()
            elif rel not in wanted:
                raise IntegrityError(
                    f"'{rel}' in {dest_dir} is not part of engine {manifest.engine_digest}: use an empty directory",
                    rel,
                )

    def download_prefix(self, prefix: str, dest_dir: Path, parallelism: int | None = None) -> int:
        """Download every object under a prefix (a model checkpoint) into dest_dir; sizes are checked. Returns bytes."""
        log = get_logger(stage="fetch")
        prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"
        listed = self.list_objects(prefix)
        jobs = []
        for key, size in sorted(listed.items()):
            rel = key[len(prefix) :]
            if not rel or rel.endswith("/"):
                continue
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts:
                raise IntegrityError(f"refusing object key with an unsafe path: {key}", rel)
            jobs.append(FileJob(key=key, dest=dest_dir / rel, size=size, sha256=None, name=rel))
        if not jobs:
            raise StoreError(f"no objects under s3://{self.location.bucket}/{prefix}: check the model source URI")
        total = sum(j.size for j in jobs)
        prog = Progress(log, "fetch", total, self.tuning.progress_interval_s)
        self._download_files(jobs, parallelism or self.tuning.concurrency, prog)
        log.info(
            "fetched model from S3", uri=f"s3://{self.location.bucket}/{prefix}", files=len(jobs), **prog.summary()
        )
        return total

    def _download_files(self, jobs: list[FileJob], parallelism: int, prog: Progress) -> None:
        """Parallel ranged GETs into `<file>.llmengine-partial`, verified, renamed if good.

        A file the manifest gives part checks for (chaining values, or digests) is fetched part by part, each part
        hashed by the thread that receives it as it arrives and checked (files.range_checks): every byte verified,
        on every core. A file of one range is hashed the same way against its SHA-256. A file of several ranges
        without usable part checks (an older manifest, or chaining values where they cannot be read) is hashed in
        order on this thread as its ranges land; all ranges of all files
        share one pool (FIFO), so that hash trails the network by a few ranges instead of adding a second pass.
        """
        part = self.tuning.part_size
        with self._s3(), ThreadPoolExecutor(max_workers=max(1, parallelism), thread_name_prefix="s3get") as pool:
            pending: list[tuple[FileJob, list[tuple[int, int, Future[str | None]]], list[RangeCheck] | None]] = []
            try:
                for job in jobs:
                    if already_present(job):
                        prog.add(job.size)
                        continue
                    job.dest.parent.mkdir(parents=True, exist_ok=True)
                    partial = job.partial
                    with open(partial, "wb") as f:
                        self._make_room(f.fileno(), job)
                    if job.part_size is not None:
                        ranges = byte_ranges(job.size, job.part_size)
                    else:
                        ranges = byte_ranges(job.size, part if job.size >= self.tuning.ranged_threshold else job.size)
                    # What each range is checked against where it is received; None: the whole file hashed in
                    # order here (or, without a SHA-256, not at all).
                    checks = range_checks(job, ranges)
                    futs = [
                        (
                            off,
                            ln,
                            pool.submit(
                                self._get_range, job, off, ln, len(ranges) > 1, prog, checks[i] if checks else None
                            ),
                        )
                        for i, (off, ln) in enumerate(ranges)
                    ]
                    pending.append((job, futs, checks))
                for job, futs, checks in pending:
                    self._finish_file(job, futs, checks)
            except BaseException:
                for _, futs, _ in pending:
                    for _, _, fut in futs:
                        fut.cancel()
                for job, _, _ in pending:
                    with contextlib.suppress(FileNotFoundError):
                        job.partial.unlink()
                raise

    @staticmethod
    def _make_room(fd: int, job: FileJob) -> None:
        """The partial file at its full size, its blocks allocated where the file system can (files.preallocate:
        the streams writing it then never allocate under its lock). A disk without room for the file is an error
        naming it and the space, before a byte is fetched."""
        try:
            preallocate(fd, job.size)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                job.partial.unlink()
            if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            room = "over its disk quota" if exc.errno == errno.EDQUOT else f"{_amount(free_bytes(fd))} free there"
            raise StoreError(
                f"no room for '{job.name}' ({_amount(job.size)}) in {job.partial.parent}: {room} "
                f"({os.strerror(exc.errno)})"
            ) from exc

    def _get_range(
        self, job: FileJob, offset: int, length: int, ranged: bool, prog: Progress, check: RangeCheck | None
    ) -> str | None:
        """GET [offset, offset+length) into the partial file; with a check, the value its hash reached (compared
        by the caller). A body cut short or a store that went away is asked again for the bytes still missing
        (from `reached`, which each attempt moves on, as it feeds the hash), within the retry budget."""
        sha = check.start() if check is not None else None
        if length == 0:
            return check.result(sha) if check is not None else None
        end = offset + length
        reached = [offset]
        self._patient(
            f"download {job.name}",
            lambda: self._get_bytes(job, reached, end, ranged or reached[0] > offset, prog, sha),
        )
        if reached[0] != end:
            raise IntegrityError(
                f"'{job.name}' ended after {reached[0]} bytes, expected {end} (truncated in the store)", job.name
            )
        return check.result(sha) if check is not None else None

    def _get_bytes(
        self, job: FileJob, reached: list[int], end: int, ranged: bool, prog: Progress, sha: Any | None
    ) -> None:
        """One GET of [reached[0], end), writing at reached[0] and moving it on with every block written (and
        hashed, when sha is given): receive.py."""
        if reached[0] >= end:
            return  # the body was cut after its last byte: nothing is missing
        kwargs: dict[str, Any] = {"Bucket": self.location.bucket, "Key": job.key}
        if ranged:
            kwargs["Range"] = f"bytes={reached[0]}-{end - 1}"
        try:
            if job.url is not None:
                body: Any = urls.get_range(job.url, job.name, reached[0], end, ranged)
            else:
                body = self.client.get_object(**kwargs)["Body"]
        except StoreError:
            raise
        except Exception as exc:
            code = error_code(exc)
            if code in ("NoSuchKey", "404"):
                raise IntegrityError(f"'{job.name}' disappeared from the store during download", job.name) from exc
            if code == "InvalidRange":
                raise IntegrityError(
                    f"'{job.name}' is shorter in the store than expected (truncated)", job.name
                ) from exc
            raise
        fd = os.open(job.partial, os.O_RDWR)
        try:
            receive(body, fd, reached, end, sha, prog.add, job.name)
        finally:
            os.close(fd)
            close(body)

    def _finish_file(
        self, job: FileJob, futs: list[tuple[int, int, Future[str | None]]], checks: list[RangeCheck] | None
    ) -> None:
        if checks is not None:
            for number, ((_, _, fut), check) in enumerate(zip(futs, checks, strict=True), 1):
                got = fut.result()
                if got != check.want:
                    where = f"part {number} of {len(futs)}: " if len(futs) > 1 else ""
                    self._refuse(job, got, check.want, where, check.what)
        elif job.sha256 is not None:
            sha = hashlib.sha256()
            buf = bytearray(HASH_BLOCK)
            with open(job.partial, "rb", buffering=0) as f:
                for off, ln, fut in futs:
                    fut.result()
                    hash_range(f.fileno(), off, ln, sha, buf)
            if sha.hexdigest() != job.sha256:
                self._refuse(job, sha.hexdigest(), job.sha256)
        else:
            for _, _, fut in futs:
                fut.result()
        os.replace(job.partial, job.dest)

    @staticmethod
    def _refuse(job: FileJob, got: str | None, want: str, where: str = "", what: str = "sha256") -> None:
        job.partial.unlink(missing_ok=True)
        raise IntegrityError(
            f"'{job.name}' failed verification: {where}{what} {(got or '')[:16]}... "
            f"does not match the manifest's {want[:16]}... (corrupted)",
            job.name,
        )

    # -- quarantine -------------------------------------------------------------------------------------------------

    def quarantine_engine(self, digest: str, reason: str) -> str:
        """Uncommit an engine whose files fail verification, keeping everything for inspection: the manifest is
        copied to quarantine/<time>-<build id>-manifest.json with the reason next to it, then deleted, so that the
        next build commits afresh (into a directory of its own). Returns the key of the copy."""
        manifest = self.get_manifest(digest)
        if manifest is None:
            return ""
        stamp = iso(utcnow()).replace("-", "").replace(":", "")
        base = f"{QUARANTINE_DIR}{stamp}-{manifest.build_id or 'top'}-"
        self._put_bytes(digest, base + MANIFEST_NAME, manifest.to_json().encode())
        self._put_bytes(digest, base + "reason.txt", reason.encode())
        with self._s3():
            self.client.delete_object(Bucket=self.location.bucket, Key=self.key(digest, MANIFEST_NAME))
        get_logger(engine_digest=digest).warning("engine quarantined", reason=reason, record=self.key(digest, base))
        return self.key(digest, base + MANIFEST_NAME)

    # -- delete (tests and garbage collection only) ----------------------------------------------------------------

    def delete_engine(self, digest: str) -> int:
        """Remove an engine: the manifest first (uncommit), then everything else. Returns objects deleted."""
        with self._s3():
            self.client.delete_object(Bucket=self.location.bucket, Key=self.key(digest, MANIFEST_NAME))
        return self._delete_prefix(self.location.engine_prefix(digest)) + 1

    def _delete_prefix(self, prefix: str) -> int:
        """Delete every object under a key prefix; returns how many."""
        bucket = self.location.bucket
        with self._s3():
            keys = list(self.list_objects(prefix))
            for i in range(0, len(keys), 1000):
                batch: list[Any] = [{"Key": k} for k in keys[i : i + 1000]]
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)


def store_for(location: StoreLocation, tuning: TransferTuning | None = None, **client_overrides: Any) -> EngineStore:
    """An EngineStore for a location; credentials from the environment (or workload identity)."""
    client = make_s3_client(S3Config.for_location(location, **client_overrides))
    return EngineStore(client, location, tuning or TransferTuning.from_env())


def load_grant(path: Path) -> EngineGrant:
    """The engine grant a pod reads from its mounted Secret; StoreError naming the file when it is not one."""
    try:
        return EngineGrant.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise StoreError(f"no engine grant at {path}: the operator writes it once the engine is committed") from exc
    except ValidationError as exc:
        raise StoreError(f"{path} is not an engine grant: {first_problem(exc)}") from exc


def _amount(n: int) -> str:
    """Bytes as a person reads them in an error: GiB from 1 GiB up, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
