"""Engine grants against a real S3 server (versitygw): presigned URLs read one engine's files and nothing else, and a
download through them verifies every file as a download with credentials does."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llmengine.api.artifacts import EngineGrant, StoreLocation
from llmengine.clients.store import EngineStore, IntegrityError, StoreError, TransferTuning, file_sha256
from llmengine.dev.s3 import S3Endpoint
from tests.integration.test_store import MiB, make_store, small_engine, upload


def _anonymous(ep: S3Endpoint, bucket: str) -> EngineStore:
    """What a serving pod holds: no credentials at all (its S3 client never signs a request here)."""
    from llmengine.clients.store import S3Config, make_s3_client

    client = make_s3_client(S3Config(endpoint=ep.endpoint, access_key_id="none", secret_access_key="none"))
    return EngineStore(client, StoreLocation(bucket=bucket, endpoint=ep.endpoint), TransferTuning(part_size=MiB))


def _grant(store: EngineStore, *digests: str, seconds: int = 600) -> EngineGrant:
    return EngineGrant(
        location=store.location,
        expires_at="2099-01-01T00:00:00Z",
        engines={d: store.grant(d, seconds) for d in digests},
    )


def _status(url: str, method: str = "GET", data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.fixture
def store(s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path) -> EngineStore:
    s = make_store(s3_endpoint, s3_bucket)
    upload(s, "eng-a", small_engine(tmp_path / "a"))
    upload(s, "eng-b", small_engine(tmp_path / "b", ranks=1))
    return s


def test_a_download_through_a_grant_verifies_every_file(
    store: EngineStore, s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    grant = _grant(store, "eng-a")
    out = tmp_path / "out"
    manifest = _anonymous(s3_endpoint, s3_bucket).download_granted(grant, "eng-a", out)
    assert sorted(f.path for f in manifest.files) == ["config.json", "rank0.engine", "rank1.engine", "tokenizer.json"]
    for f in manifest.files:
        assert file_sha256(out / f.path) == f.sha256
    with pytest.raises(StoreError, match="no URLs for engine eng-b"):
        _anonymous(s3_endpoint, s3_bucket).download_granted(grant, "eng-b", tmp_path / "other")


def test_a_damaged_file_read_through_a_grant_is_refused_naming_it(
    store: EngineStore, s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    grant = _grant(store, "eng-a")
    manifest = store.get_manifest("eng-a")
    assert manifest is not None
    key = store.file_key(manifest, "rank1.engine")
    data = bytearray(store.client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    data[7] ^= 0xFF
    store.client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
    with pytest.raises(IntegrityError) as exc:
        _anonymous(s3_endpoint, s3_bucket).download_granted(grant, "eng-a", tmp_path / "out")
    assert exc.value.path == "rank1.engine" and "failed verification" in str(exc.value)


def test_a_grant_reads_only_its_files_and_writes_nothing(store: EngineStore, s3_bucket: str) -> None:
    url = _grant(store, "eng-a").engines["eng-a"].urls["rank0.engine"]
    assert _status(url) == 200
    # The same signature for another object, or for a write, is refused by the store.
    mine, other = store.get_manifest("eng-a"), store.get_manifest("eng-b")
    assert mine is not None and other is not None
    forged = url.replace(store.file_key(mine, "rank0.engine"), store.file_key(other, "rank0.engine"))
    assert forged != url and _status(forged) == 403
    assert _status(url, "PUT", b"overwritten") == 403
    assert _status(url, "DELETE") == 403


def test_an_expired_grant_is_refused_with_a_clear_error(
    store: EngineStore, s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    import time

    grant = _grant(store, "eng-a", seconds=1)
    time.sleep(2.5)
    with pytest.raises(StoreError, match="grant expired"):
        _anonymous(s3_endpoint, s3_bucket).download_granted(grant, "eng-a", tmp_path / "out")
