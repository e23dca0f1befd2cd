"""The engine store: content-addressed engine directories in S3, committed by a manifest written last.

Layout: ``s3://<bucket>/<prefix>/<digest>/<files...>`` plus ``build-result.json`` and, last, ``manifest.json``.
An engine is committed exactly when its manifest is present and parses. Readers never trust anything else: the
download checks every file's size and SHA-256 against the manifest before the engine may be served.

Used by the operator (from asyncio through ``asyncio.to_thread``), the builder and the server. ``EngineStore``
holds nothing but the (thread-safe) boto3 client and the location, so one instance may be shared by threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

import boto3
from botocore import exceptions as bx
from botocore.config import Config
from pydantic import ValidationError
from urllib3 import exceptions as u3

from llmengine.api.artifacts import (
    BuildResult,
    BuildShapes,
    Manifest,
    ManifestFile,
    Provenance,
    StoreLocation,
    first_problem,
)
from llmengine.logging import get_logger
from llmengine.text import one_line

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

MANIFEST_NAME = "manifest.json"
RESULT_NAME = "build-result.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME, RESULT_NAME})
PARTIAL_SUFFIX = ".llmengine-partial"
MiB = 1024 * 1024
DEFAULT_RETRY_SECONDS = 120.0
T = TypeVar("T")

# Settings the one-line errors point at (the LLMEngine fields a user edits).
SETTING_CREDENTIALS = "spec.store.credentialsSecretRef"
SETTING_BUCKET = "spec.store.bucket"
SETTING_ENDPOINT = "spec.store.endpoint"
# The same settings when an engine uses the operator's default store: the chart's values, not the spec's.
DEFAULT_STORE_SETTINGS = {
    SETTING_CREDENTIALS: "the operator's default store credentials (chart values store.credentialsSecret and "
    "store.engineSecret)",
    SETTING_BUCKET: "the operator's default store (chart value store.bucket)",
    SETTING_ENDPOINT: "the operator's default store (chart value store.endpoint)",
}


def on_default_store(message: str) -> str:
    """A store error for an engine without spec.store names the chart values actually in use."""
    for spec_field, chart_value in DEFAULT_STORE_SETTINGS.items():
        message = message.replace(spec_field, chart_value)
    return message


# ---------------------------------------------------------------------------------------------------------------
# Errors


class StoreError(Exception):
    """A store operation failed. The message is one line; ``setting`` names what the user should fix, if any."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class CredentialsError(StoreError):
    pass


class AccessDenied(StoreError):
    pass


class BucketNotFound(StoreError):
    pass


class EndpointUnreachable(StoreError):
    pass


class ManifestInvalid(StoreError):
    """A manifest.json exists but does not parse as a Manifest: a broken commit, rebuilt over by the builder."""


class IntegrityError(StoreError):
    """The stored engine does not match its manifest (or has none). ``path`` names the file when one is at fault."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message, setting=None)
        self.path = path


# AWS codes, plus versitygw's answer for an unknown access key.
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "InvalidClientTokenId",
        "XAdminUserNotFound",
    }
)


def translate_error(exc: BaseException, endpoint: str, bucket: str) -> StoreError:
    """Map a botocore/s3transfer exception to a one-line StoreError naming the setting to fix."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return CredentialsError(
            "no S3 credentials found: set spec.store.credentialsSecretRef or configure workload identity",
            SETTING_CREDENTIALS,
        )
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ConnectionClosedError):
        return EndpointUnreachable(f"cannot reach S3 endpoint {endpoint}: check {SETTING_ENDPOINT}", SETTING_ENDPOINT)
    if isinstance(exc, bx.ReadTimeoutError):
        return EndpointUnreachable(f"S3 endpoint {endpoint} timed out: check {SETTING_ENDPOINT}", SETTING_ENDPOINT)
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code in _CREDENTIAL_CODES:
            return CredentialsError(
                f"S3 rejected the credentials ({code}): check the secret named in {SETTING_CREDENTIALS}",
                SETTING_CREDENTIALS,
            )
        if code == "NoSuchBucket":
            return BucketNotFound(
                f"bucket '{bucket}' does not exist at {endpoint}: create it or fix {SETTING_BUCKET}", SETTING_BUCKET
            )
        if code in ("AccessDenied", "403", "Forbidden"):
            return AccessDenied(
                f"S3 denied access to bucket '{bucket}' ({code}): grant the credentials in "
                f"{SETTING_CREDENTIALS} read/write on it",
                SETTING_CREDENTIALS,
            )
        msg = str(err.get("Message", "")) or str(exc)
        return StoreError(f"S3 error {code or 'unknown'} at {endpoint}: {one_line(msg)}")
    if isinstance(exc, bx.BotoCoreError):
        return StoreError(f"S3 client error at {endpoint}: {one_line(str(exc))}")
    return StoreError(f"S3 operation failed at {endpoint}: {type(exc).__name__}: {one_line(str(exc))}")


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, bx.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


# Worth waiting out: the server is restarting or overloaded, a connection was refused or cut mid-body.
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException", "Throttling"}
)
_TRANSIENT_EXCEPTIONS = (
    bx.ConnectionError,  # refused, reset, closed, connect timeout
    bx.HTTPClientError,  # read timeout, protocol errors
    bx.ResponseStreamingError,  # the body was cut
    bx.IncompleteReadError,
    u3.ProtocolError,
    u3.ReadTimeoutError,
    ConnectionError,
)


def is_transient(exc: BaseException) -> bool:
    """True for failures that another attempt may get past: not credentials, not a missing bucket or object."""
    if isinstance(exc, bx.SSLError):
        return False  # a certificate problem stays one
    if isinstance(exc, (EndpointUnreachable, *_TRANSIENT_EXCEPTIONS)):
        return True
    if isinstance(exc, bx.ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return _error_code(exc) in _TRANSIENT_CODES or status >= 500
    return False


class _Patience:
    """Retries of one operation against a store that is briefly away, bounded by a time budget.

    botocore's own retries (standard mode) give up within about a second; a restarting S3 gateway or a rolling
    MinIO upgrade takes longer, and giving up means redoing a whole build or failing a serving pod. Waits grow
    from 0.5 s to 10 s with jitter; every wait is logged.
    """

    def __init__(self, budget_s: float, what: str, log: Any) -> None:
        self.deadline = time.monotonic() + budget_s
        self.what, self.log, self.attempt = what, log, 0

    def wait_or_raise(self, exc: BaseException, endpoint: str) -> None:
        """Sleep before the next attempt, or re-raise `exc` (the caller is in its except block)."""
        delay = min(0.5 * 2**self.attempt, 10.0) * random.uniform(0.5, 1.0)
        left = self.deadline - time.monotonic()
        if not is_transient(exc) or left < delay:
            raise exc
        self.attempt += 1
        self.log.warning(
            "S3 request failed; retrying",
            op=self.what,
            endpoint=endpoint,
            attempt=self.attempt,
            retry_in_s=round(delay, 2),
            budget_left_s=round(left, 1),
            error=f"{type(exc).__name__}: {one_line(str(exc), 200)}",
        )
        time.sleep(delay)


# ---------------------------------------------------------------------------------------------------------------
# Client


@dataclass(frozen=True)
class S3Config:
    """How to reach S3. Without explicit keys, boto3's default chain applies (env AWS_*, web identity, IMDS).

    Secrets are excluded from repr so the config can be logged.
    """

    endpoint: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 5
    max_pool_connections: int = 32

    @classmethod
    def for_location(cls, location: StoreLocation, **overrides: Any) -> S3Config:
        """Endpoint and region from the location; AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL when it names none."""
        endpoint = location.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return cls(endpoint=endpoint or None, region=location.region, **overrides)


def make_s3_client(cfg: S3Config) -> S3Client:
    """A boto3 S3 client: path-style addressing (S3-compatible servers), standard retries, bounded timeouts.

    Each call gets its own boto3 Session: sessions are not thread-safe, clients are.
    """
    session = boto3.session.Session()
    config = Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        max_pool_connections=cfg.max_pool_connections,
        # Integrity is ours (SHA-256 per file against the manifest); the newer default CRC trailers are not
        # understood by every S3-compatible server.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client: S3Client = session.client(
        "s3",
        endpoint_url=cfg.endpoint,
        region_name=cfg.region,
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        aws_session_token=cfg.session_token,
        config=config,
    )
    return client


@dataclass(frozen=True)
class TransferTuning:
    """Part size and parallelism of uploads and downloads.

    64 MiB parts keep a 140 GB rank file well under S3's 10,000-part limit and amortise per-request overhead;
    8 streams saturate a 10-25 Gbit/s link to S3 without holding more than ~(concurrency + 2) parts in memory.
    """

    part_size: int = 64 * MiB
    concurrency: int = 8
    # Files at least this large are fetched with parallel ranged GETs; smaller ones with one GET.
    ranged_threshold: int = 64 * MiB
    progress_interval_s: float = 5.0
    # How long each request (a part, a range, a manifest read) keeps retrying while the store is unreachable, on
    # top of botocore's own (~1 s) retries. 0 for the operator, whose reconcile loop retries anyway; the builder and
    # the server wait (from_env).
    retry_seconds: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TransferTuning:
        """Tuning for the builder and the server: LLMENGINE_S3_PART_SIZE_MIB, LLMENGINE_S3_CONCURRENCY and
        LLMENGINE_S3_RETRY_SECONDS (default 120) when set."""
        env = os.environ if env is None else env
        base = cls()
        part = int(env.get("LLMENGINE_S3_PART_SIZE_MIB") or 0) * MiB or base.part_size
        conc = int(env.get("LLMENGINE_S3_CONCURRENCY") or 0) or base.concurrency
        retry = float(env.get("LLMENGINE_S3_RETRY_SECONDS") or DEFAULT_RETRY_SECONDS)
        # S3 refuses multipart parts under 5 MiB (except the last).
        part = max(part, 5 * MiB)
        return cls(part_size=part, concurrency=max(1, conc), ranged_threshold=part, retry_seconds=max(0.0, retry))


# ---------------------------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """Thread-safe byte counter that logs bytes, total and rate at most every `interval` seconds."""

    def __init__(self, log: Any, op: str, total: int, interval: float) -> None:
        self._log, self._op, self._total, self._interval = log, op, total, interval
        self._lock = threading.Lock()
        self._done = 0
        self._start = self._last = time.monotonic()

    def add(self, n: int) -> None:
        with self._lock:
            self._done += n
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            self._last = now
            done, elapsed = self._done, now - self._start
        self._log.info(
            f"{self._op} progress",
            bytes=done,
            total_bytes=self._total,
            percent=round(100.0 * done / self._total, 1) if self._total else 100.0,
            rate_mib_s=round(done / MiB / elapsed, 1) if elapsed > 0 else None,
        )

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self._start
        return {
            "bytes": self._done,
            "seconds": round(elapsed, 3),
            "rate_mib_s": round(self._done / MiB / elapsed, 1) if elapsed > 0 else None,
        }


# ---------------------------------------------------------------------------------------------------------------
# Upload helpers


def _local_files(root: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel in RESERVED_NAMES or rel.endswith(PARTIAL_SUFFIX):
                continue
            out.append((rel, p))
    return out


def check_manifest_paths(files: list[ManifestFile]) -> None:
    """Every entry must be a unique, relative, normalised path that is not one of the store's own documents."""
    seen: set[str] = set()
    for f in files:
        p = PurePosixPath(f.path)
        if (
            not f.path
            or p.is_absolute()
            or ".." in p.parts
            or str(p) != f.path
            or f.path in RESERVED_NAMES
            or f.path.endswith(PARTIAL_SUFFIX)
        ):
            raise IntegrityError(
                f"manifest lists an unexpected entry '{f.path}' (not a plain relative file path)", f.path
            )
        if f.path in seen:
            raise IntegrityError(f"manifest lists '{f.path}' twice", f.path)
        if f.size < 0 or len(f.sha256) != 64:
            raise IntegrityError(f"manifest entry '{f.path}' has an invalid size or sha256", f.path)
        seen.add(f.path)


# ---------------------------------------------------------------------------------------------------------------
# The store


class EngineStore:
    """Engines under one StoreLocation. Stateless apart from the client: safe to share across threads."""

    def __init__(self, client: S3Client, location: StoreLocation, tuning: TransferTuning | None = None) -> None:
        self.client = client
        self.location = location
        self.tuning = tuning or TransferTuning()

    # -- naming ---------------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def key(self, digest: str, name: str) -> str:
        return self.location.engine_prefix(digest) + name

    def uri(self, digest: str) -> str:
        return self.location.engine_uri(digest)

    @contextlib.contextmanager
    def _s3(self) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except Exception as exc:
            raise translate_error(exc, self.endpoint, self.location.bucket) from exc

    def _patience(self, what: str) -> _Patience:
        return _Patience(self.tuning.retry_seconds, what, get_logger(stage="s3"))

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
                if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
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
        return manifest

    def is_committed(self, digest: str) -> bool:
        return self.get_manifest(digest) is not None

    def get_result(self, digest: str) -> BuildResult | None:
        raw = self._get_json(digest, RESULT_NAME)
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

    def put_result(self, digest: str, result: BuildResult) -> None:
        self._put_bytes(digest, RESULT_NAME, result.to_json().encode())

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

    def upload_file(self, local: Path, key: str, progress: _Progress | None = None) -> tuple[str, int]:
        """Upload one file; returns (sha256, size), the hash computed while reading it once.

        Files above the part size go up as a multipart upload, `concurrency` parts at a time with at most
        concurrency + 2 parts in memory. Each part (and the single PUT of a small file) is retried on its own while
        the store is unreachable, within the retry budget: an outage costs the parts in flight, not the file.
        """
        size = local.stat().st_size
        prog = progress or _Progress(get_logger(), "upload", size, self.tuning.progress_interval_s)
        bucket = self.location.bucket
        # S3 allows 10,000 parts: grow the part for files that would need more.
        part = max(self.tuning.part_size, -(-size // 10_000))
        sha = hashlib.sha256()
        with self._s3(), open(local, "rb") as f:
            if size <= part:
                data = f.read()
                sha.update(data)
                self._patient(f"upload {local.name}", lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data))
                prog.add(len(data))
                read = len(data)
            else:
                read = self._multipart(local.name, f, key, part, sha, prog)
        if read != size:
            raise StoreError(f"{local} changed size while uploading ({size} -> {read} bytes)")
        return sha.hexdigest(), size

    def _multipart(self, name: str, f: IO[bytes], key: str, part: int, sha: Any, prog: _Progress) -> int:
        bucket = self.location.bucket
        started = self._patient(f"upload {name}", lambda: self.client.create_multipart_upload(Bucket=bucket, Key=key))
        upload_id = started["UploadId"]
        done: list[Any] = []  # CompletedPartTypeDef
        inflight: list[Future[dict[str, Any]]] = []
        read = 0
        try:
            conc = max(1, self.tuning.concurrency)
            with ThreadPoolExecutor(max_workers=conc, thread_name_prefix="s3put") as pool:
                try:
                    number = 0
                    while data := f.read(part):
                        sha.update(data)
                        read += len(data)
                        number += 1
                        inflight.append(pool.submit(self._put_part, name, key, upload_id, number, data, prog))
                        while len(inflight) >= conc + 2:
                            done.append(inflight.pop(0).result())
                    done += [fut.result() for fut in inflight]
                except BaseException:
                    for fut in inflight:
                        fut.cancel()  # parts not started yet would each wait out a budget of their own
                    raise
            self._patient(f"upload {name}", lambda: self._complete(key, upload_id, done, read))
        except BaseException:
            with contextlib.suppress(Exception):
                self._patient(
                    f"abort upload of {name}",
                    lambda: self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id),
                )
            raise
        return read

    def _complete(self, key: str, upload_id: str, parts: list[Any], size: int) -> None:
        bucket = self.location.bucket
        try:
            self.client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except bx.ClientError as exc:
            # A completion whose response was lost, retried: the upload is gone because the object is complete.
            if _error_code(exc) != "NoSuchUpload":
                raise
            head = self.client.head_object(Bucket=bucket, Key=key)
            if int(head.get("ContentLength") or -1) != size:
                raise

    def _put_part(
        self, name: str, key: str, upload_id: str, number: int, data: bytes, prog: _Progress
    ) -> dict[str, Any]:
        bucket = self.location.bucket
        got = self._patient(
            f"upload {name} part {number}",
            lambda: self.client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data),
        )
        prog.add(len(data))
        return {"PartNumber": number, "ETag": got["ETag"]}

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
    ) -> Manifest:
        """Upload every file of an engine directory, then the build result, then (last) the manifest.

        A crash before the final PUT leaves no manifest, so the engine stays uncommitted and a retry re-uploads.
        """
        log = get_logger(engine_digest=digest, stage="upload")
        files = _local_files(local_dir)
        if not files:
            raise StoreError(f"nothing to upload: {local_dir} has no files")
        total = sum(p.stat().st_size for _, p in files)
        prog = _Progress(log, "upload", total, self.tuning.progress_interval_s)
        log.info("upload started", uri=self.uri(digest), files=len(files), total_bytes=total)
        entries: list[ManifestFile] = []
        for rel, path in files:
            sha, size = self.upload_file(path, self.key(digest, rel), prog)
            entries.append(ManifestFile(path=rel, sha256=sha, size=size))
        self._check_uploaded(digest, entries)
        manifest = Manifest(
            engine_digest=digest,
            backend=backend,
            tp_size=tp_size,
            pp_size=pp_size,
            shapes=shapes,
            files=entries,
            provenance=provenance,
        )
        if result is not None:
            self.put_result(digest, result)
        self._put_bytes(digest, MANIFEST_NAME, manifest.to_json().encode())
        log.info("upload committed", uri=self.uri(digest), files=len(entries), **prog.summary())
        return manifest

    def _check_uploaded(self, digest: str, entries: list[ManifestFile]) -> None:
        """Read back the sizes the store reports before committing: a silently short object must not commit."""
        listed = self.list_objects(self.location.engine_prefix(digest))
        for e in entries:
            got = listed.get(self.key(digest, e.path))
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
        listed = self.list_objects(self.location.engine_prefix(digest))
        for f in manifest.files:
            got = listed.get(self.key(digest, f.path))
            if got is None:
                raise IntegrityError(
                    f"'{f.path}' is listed in the manifest but missing from {self.uri(digest)}", f.path
                )
            if got != f.size:
                raise IntegrityError(
                    f"'{f.path}' is {got} bytes in the store but the manifest says {f.size} (truncated or replaced)",
                    f.path,
                )
        expected = {self.key(digest, f.path) for f in manifest.files} | {self.key(digest, n) for n in RESERVED_NAMES}
        extra = sorted(k for k in listed if k not in expected)
        if extra:
            log.warning("store has objects the manifest does not list; ignoring them", objects=extra[:10])
        dest_dir.mkdir(parents=True, exist_ok=True)
        self._check_dest(dest_dir, manifest)
        prog = _Progress(log, "download", manifest.total_bytes, self.tuning.progress_interval_s)
        log.info("download started", uri=self.uri(digest), files=len(manifest.files), total_bytes=manifest.total_bytes)
        jobs = [
            _FileJob(key=self.key(digest, f.path), dest=dest_dir / f.path, size=f.size, sha256=f.sha256, name=f.path)
            for f in manifest.files
        ]
        self._download_files(jobs, parallelism or self.tuning.concurrency, prog)
        (dest_dir / MANIFEST_NAME).write_text(manifest.to_json())
        log.info("download verified", dest=str(dest_dir), files=len(jobs), **prog.summary())
        return manifest

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
            jobs.append(_FileJob(key=key, dest=dest_dir / rel, size=size, sha256=None, name=rel))
        if not jobs:
            raise StoreError(f"no objects under s3://{self.location.bucket}/{prefix}: check the model source URI")
        total = sum(j.size for j in jobs)
        prog = _Progress(log, "fetch", total, self.tuning.progress_interval_s)
        self._download_files(jobs, parallelism or self.tuning.concurrency, prog)
        log.info(
            "fetched model from S3", uri=f"s3://{self.location.bucket}/{prefix}", files=len(jobs), **prog.summary()
        )
        return total

    def _download_files(self, jobs: list[_FileJob], parallelism: int, prog: _Progress) -> None:
        """Parallel ranged GETs into `<file>.llmengine-partial`, hashed in order as parts land, renamed if good.

        All parts of all files share one pool (FIFO), so the in-order hashing on this thread trails the network
        by a few parts and overlaps with it instead of adding a second pass.
        """
        part = self.tuning.part_size
        with self._s3(), ThreadPoolExecutor(max_workers=max(1, parallelism), thread_name_prefix="s3get") as pool:
            pending: list[tuple[_FileJob, list[tuple[int, int, Future[None]]]]] = []
            try:
                for job in jobs:
                    if _already_present(job):
                        prog.add(job.size)
                        continue
                    job.dest.parent.mkdir(parents=True, exist_ok=True)
                    partial = job.partial
                    with open(partial, "wb") as f:
                        f.truncate(job.size)
                    ranges = _ranges(job.size, part if job.size >= self.tuning.ranged_threshold else job.size)
                    futs = [
                        (off, ln, pool.submit(self._get_range, job, off, ln, len(ranges) > 1, prog))
                        for off, ln in ranges
                    ]
                    pending.append((job, futs))
                for job, futs in pending:
                    self._finish_file(job, futs)
            except BaseException:
                for _, futs in pending:
                    for _, _, fut in futs:
                        fut.cancel()
                for job, _ in pending:
                    with contextlib.suppress(FileNotFoundError):
                        job.partial.unlink()
                raise

    def _get_range(self, job: _FileJob, offset: int, length: int, ranged: bool, prog: _Progress) -> None:
        """GET [offset, offset+length) into the partial file. A body cut short or a store that went away is asked
        again for the bytes still missing (from `reached`, which each attempt moves on), within the retry budget."""
        if length == 0:
            return
        end = offset + length
        reached = [offset]
        self._patient(
            f"download {job.name}", lambda: self._get_bytes(job, reached, end, ranged or reached[0] > offset, prog)
        )
        if reached[0] != end:
            raise IntegrityError(
                f"'{job.name}' ended after {reached[0]} bytes, expected {end} (truncated in the store)", job.name
            )

    def _get_bytes(self, job: _FileJob, reached: list[int], end: int, ranged: bool, prog: _Progress) -> None:
        """One GET of [reached[0], end), writing at reached[0] and moving it on with every chunk written."""
        if reached[0] >= end:
            return  # the body was cut after its last byte: nothing is missing
        kwargs: dict[str, Any] = {"Bucket": self.location.bucket, "Key": job.key}
        if ranged:
            kwargs["Range"] = f"bytes={reached[0]}-{end - 1}"
        try:
            body = self.client.get_object(**kwargs)["Body"]
        except Exception as exc:
            code = _error_code(exc)
            if code in ("NoSuchKey", "404"):
                raise IntegrityError(f"'{job.name}' disappeared from the store during download", job.name) from exc
            if code == "InvalidRange":
                raise IntegrityError(
                    f"'{job.name}' is shorter in the store than expected (truncated)", job.name
                ) from exc
            raise
        fd = os.open(job.partial, os.O_WRONLY)
        try:
            while chunk := body.read(MiB):
                pos = reached[0]
                if pos + len(chunk) > end:
                    raise IntegrityError(f"'{job.name}' is longer in the store than the manifest says", job.name)
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
                reached[0] = pos
                prog.add(len(chunk))
        finally:
            os.close(fd)
            body.close()

    def _finish_file(self, job: _FileJob, futs: list[tuple[int, int, Future[None]]]) -> None:
        sha = hashlib.sha256()
        with open(job.partial, "rb", buffering=0) as f:
            for off, ln, fut in futs:
                fut.result()
                _hash_range(f, off, ln, sha)
        if job.sha256 is not None and sha.hexdigest() != job.sha256:
            job.partial.unlink(missing_ok=True)
            raise IntegrityError(
                f"'{job.name}' failed verification: sha256 {sha.hexdigest()[:16]}... "
                f"does not match the manifest's {job.sha256[:16]}... (corrupted)",
                job.name,
            )
        os.replace(job.partial, job.dest)

    # -- delete (tests and garbage collection only) ----------------------------------------------------------------

    def delete_engine(self, digest: str) -> int:
        """Remove an engine: the manifest first (uncommit), then everything else. Returns objects deleted."""
        bucket = self.location.bucket
        with self._s3():
            self.client.delete_object(Bucket=bucket, Key=self.key(digest, MANIFEST_NAME))
            keys = list(self.list_objects(self.location.engine_prefix(digest)))
            for i in range(0, len(keys), 1000):
                batch: list[Any] = [{"Key": k} for k in keys[i : i + 1000]]
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys) + 1


@dataclass
class _FileJob:
    key: str
    dest: Path
    size: int
    sha256: str | None
    name: str

    @property
    def partial(self) -> Path:
        return self.dest.with_name(self.dest.name + PARTIAL_SUFFIX)


def _ranges(size: int, part: int) -> list[tuple[int, int]]:
    if size == 0 or part <= 0:
        return [(0, size)]
    return [(off, min(part, size - off)) for off in range(0, size, part)]


def _hash_range(f: IO[bytes], offset: int, length: int, sha: Any, block: int = 8 * MiB) -> None:
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


def _already_present(job: _FileJob) -> bool:
    if job.sha256 is None:
        return False
    try:
        if job.dest.stat().st_size != job.size:
            return False
    except FileNotFoundError:
        return False
    return file_sha256(job.dest) == job.sha256


def store_for(location: StoreLocation, tuning: TransferTuning | None = None, **client_overrides: Any) -> EngineStore:
    """An EngineStore for a location; credentials from the environment (or workload identity)."""
    client = make_s3_client(S3Config.for_location(location, **client_overrides))
    return EngineStore(client, location, tuning or TransferTuning.from_env())
