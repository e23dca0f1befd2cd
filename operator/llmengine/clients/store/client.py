"""The S3 client: how to reach the store, and how big and how parallel transfers are."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import boto3
import botocore.session
from botocore.config import Config

from llmengine.api.artifacts import StoreLocation
from llmengine.clients.store import slimdata
from llmengine.clients.store.errors import SETTING_PART_CHECKSUM, StoreError
from llmengine.clients.store.layout import MiB

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client as S3Client
else:
    S3Client = Any

DEFAULT_RETRY_SECONDS = 120.0
PartChecksum = Literal["crc32c", "none"]


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
    # PEM file of the CA certificates the endpoint's TLS certificate is verified against (a private CA); unset:
    # botocore's default, which is AWS_CA_BUNDLE when the environment names one (as the pods' CA bundle does).
    ca_bundle: str | None = None

    @classmethod
    def for_location(cls, location: StoreLocation, **overrides: Any) -> S3Config:
        """Endpoint and region from the location; AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL when it names none."""
        endpoint = location.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return cls(endpoint=endpoint or None, region=location.region, **overrides)


def make_s3_client(cfg: S3Config) -> S3Client:
    """A boto3 S3 client: path-style addressing (S3-compatible servers), standard retries, bounded timeouts.

    Clients with explicit keys come from one shared Session, created one at a time (sessions are not thread-safe,
    clients are): a Session of its own parses the S3 service model again, ~12 MiB per client, where clients of one
    Session share it (~0.3 MiB each). A client without keys gets a Session of its own, so that it resolves boto3's
    default credential chain when it is made, as before.
    """
    explicit = cfg.access_key_id is not None or cfg.secret_access_key is not None
    with _SESSION_LOCK:
        session = _shared_session() if explicit else _new_session()
        return _client(session, cfg)


_SESSION_LOCK = threading.Lock()


@functools.cache
def _shared_session() -> boto3.session.Session:
    return _new_session()


@functools.cache
def _slim_data() -> Path | None:
    return slimdata.usable()


def _new_session() -> boto3.session.Session:
    """A boto3 Session on botocore's data, or on the slim copy LLMENGINE_BOTOCORE_DATA names (slimdata.py)."""
    core = botocore.session.get_session()
    slim = _slim_data()
    if slim is not None:
        slimdata.apply(core, slim)
    return boto3.session.Session(botocore_session=core)


def _client(session: boto3.session.Session, cfg: S3Config) -> S3Client:
    config = Config(
        # Requests are signed, bodies are not (x-amz-content-sha256: UNSIGNED-PAYLOAD, over https and http alike).
        # Signing a body hashes it a second time: the upload already hashes every byte for the manifest, and every
        # download verifies that SHA-256, so a body changed on the way in can never be served; TLS covers transit.
        s3={"addressing_style": "path", "payload_signing_enabled": False},
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
        verify=cfg.ca_bundle,
        config=config,
    )
    return client


@dataclass(frozen=True)
class TransferTuning:
    """Part size and parallelism of uploads and downloads.

    64 MiB parts keep a 140 GB rank file well under S3's 10,000-part limit and amortise per-request overhead;
    8 streams saturate a 10-25 Gbit/s link to S3; neither direction holds whole parts in memory (parts are read from
    the file as they are sent, and written to it as they arrive).
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
    # Uploads send each part's CRC32C, taken in the same read as the file's SHA-256, for the store to check as the
    # part lands (a part that arrives changed is refused, not committed). "none" for a store that refuses CRC32C
    # checksums (StorageGRID takes SHA-256 only).
    part_checksum: PartChecksum = "crc32c"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TransferTuning:
        """Tuning for the builder and the server: LLMENGINE_S3_PART_SIZE_MIB, LLMENGINE_S3_CONCURRENCY,
        LLMENGINE_S3_RETRY_SECONDS (default 120) and LLMENGINE_S3_PART_CHECKSUM (crc32c or none) when set."""
        env = os.environ if env is None else env
        base = cls()
        part = int(env.get("LLMENGINE_S3_PART_SIZE_MIB") or 0) * MiB or base.part_size
        conc = int(env.get("LLMENGINE_S3_CONCURRENCY") or 0) or base.concurrency
        retry = float(env.get("LLMENGINE_S3_RETRY_SECONDS") or DEFAULT_RETRY_SECONDS)
        checksum = (env.get("LLMENGINE_S3_PART_CHECKSUM") or base.part_checksum).strip().lower()
        if checksum not in get_args(PartChecksum):
            raise StoreError(
                f"LLMENGINE_S3_PART_CHECKSUM={env.get('LLMENGINE_S3_PART_CHECKSUM')!r}: use crc32c (the default: "
                "the store checks every uploaded part) or none (for a store that refuses CRC32C checksums)",
                setting=SETTING_PART_CHECKSUM,
            )
        # S3 refuses multipart parts under 5 MiB (except the last).
        part = max(part, 5 * MiB)
        return cls(
            part_size=part,
            concurrency=max(1, conc),
            ranged_threshold=part,
            retry_seconds=max(0.0, retry),
            part_checksum=cast(PartChecksum, checksum),
        )
