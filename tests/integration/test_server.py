"""serve-engine download (the init container) against a real S3 server: it serves nothing it cannot verify."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmengine.api.artifacts import BuildShapes, Provenance, StoreLocation
from llmengine.clients.store import EngineStore, S3Config, TransferTuning, make_s3_client
from llmengine.dev.s3 import S3Endpoint

MiB = 1024 * 1024
DIGEST = "f00dfeed12345678"


@pytest.fixture
def store(s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path) -> EngineStore:
    client = make_s3_client(
        S3Config(
            endpoint=s3_endpoint.endpoint,
            access_key_id=s3_endpoint.access_key,
            secret_access_key=s3_endpoint.secret_key,
        )
    )
    st = EngineStore(
        client, StoreLocation(bucket=s3_bucket, endpoint=s3_endpoint.endpoint), TransferTuning(part_size=5 * MiB)
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "rank0.engine").write_bytes(os.urandom(12 * MiB))
    st.upload_engine(
        DIGEST,
        src,
        backend="tensorrt",
        tp_size=1,
        pp_size=1,
        shapes=BuildShapes(max_batch_size=1, max_input_len=8, max_seq_len=16, max_num_tokens=16),
        provenance=Provenance(
            builder_image="i",
            trtllm_version="1.2.1",
            compiler="test",
            gpu_class="H100-80GB",
            sm="9.0",
            build_time="t",
            build_seconds=1,
            test_build=True,
        ),
    )
    return st


def download(ep: S3Endpoint, bucket: str, dest: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | ep.env()
    return subprocess.run(
        [sys.executable, "-m", "llmengine.cli", "serve-engine", "download", "--digest", DIGEST, "--bucket", bucket,
         "--endpoint", ep.endpoint, "--engine-dir", str(dest), "--parallelism", "4"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _key(store: EngineStore, name: str) -> str:
    """Where a file of the committed engine is (the manifest itself sits at the engine's top)."""
    manifest = store.get_manifest(DIGEST) if name != "manifest.json" else None
    return store.file_key(manifest, name) if manifest is not None else store.key(DIGEST, name)


def _corrupt(store: EngineStore) -> None:
    key = _key(store, "rank0.engine")
    data = bytearray(store.client.get_object(Bucket=store.location.bucket, Key=key)["Body"].read())
    data[12345] ^= 0x01
    store.client.put_object(Bucket=store.location.bucket, Key=key, Body=bytes(data))


def _truncate(store: EngineStore) -> None:
    key = _key(store, "rank0.engine")
    data = store.client.get_object(Bucket=store.location.bucket, Key=key)["Body"].read()
    store.client.put_object(Bucket=store.location.bucket, Key=key, Body=data[: len(data) // 2])


def _drop(name: str) -> Any:
    def f(store: EngineStore) -> None:
        store.client.delete_object(Bucket=store.location.bucket, Key=_key(store, name))

    return f


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_corrupt, "'rank0.engine' failed verification: "),
        (_truncate, "'rank0.engine' is 6291456 bytes in the store but the manifest says 12582912"),
        (_drop("manifest.json"), f"engine {DIGEST} is not committed: no manifest.json"),
        (_drop("config.json"), "'config.json' is listed in the manifest but missing"),
    ],
    ids=["corrupted-byte", "truncated", "no-manifest", "absent-file"],
)
def test_download_refuses_what_does_not_verify(
    s3_endpoint: S3Endpoint, s3_bucket: str, store: EngineStore, tmp_path: Path, damage: Any, needle: str
) -> None:
    damage(store)
    p = download(s3_endpoint, s3_bucket, tmp_path / "engine")
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("serve-engine:")]
    assert p.returncode == 1 and len(errors) == 1, p.stderr[-2000:]
    assert needle in errors[0]
    assert not (tmp_path / "engine" / "manifest.json").exists()


def test_download_of_an_intact_engine_succeeds(
    s3_endpoint: S3Endpoint, s3_bucket: str, store: EngineStore, tmp_path: Path
) -> None:
    p = download(s3_endpoint, s3_bucket, tmp_path / "engine")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "engine" / "rank0.engine").stat().st_size == 12 * MiB
    assert (tmp_path / "engine" / "manifest.json").exists()
