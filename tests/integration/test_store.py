"""The engine store against a real S3 server (versitygw on loopback): commit protocol, verification, errors."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from llmengine.api.artifacts import BuildResult, BuildShapes, Provenance, StoreLocation
from llmengine.clients.store import (
    BucketNotFound,
    CredentialsError,
    EndpointUnreachable,
    EngineStore,
    IntegrityError,
    ManifestInvalid,
    S3Config,
    StoreError,
    TransferTuning,
    chain,
    engine_store,
    file_sha256,
    files,
    make_s3_client,
)
from llmengine.clients.store.chain import ChainedSha256
from llmengine.dev import proc
from llmengine.dev.s3 import S3Endpoint

MiB = 1024 * 1024
GiB = 1024 * MiB
SHAPES = BuildShapes(max_batch_size=8, max_input_len=128, max_seq_len=256, max_num_tokens=512)
PROV = Provenance(
    builder_image="test",
    trtllm_version="1.2.1",
    compiler="test",
    gpu_class="H100-80GB",
    sm="9.0",
    build_time="2026-01-01T00:00:00Z",
    build_seconds=1.0,
    test_build=True,
)


def make_store(ep: S3Endpoint, bucket: str, tuning: TransferTuning | None = None, **cfg: Any) -> EngineStore:
    client = make_s3_client(
        S3Config(endpoint=ep.endpoint, access_key_id=ep.access_key, secret_access_key=ep.secret_key, **cfg)
    )
    return EngineStore(client, StoreLocation(bucket=bucket, endpoint=ep.endpoint), tuning)


def small_engine(root: Path, ranks: int = 2, size: int = 3 * MiB + 7) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"pretrained_config": {}}')
    (root / "tokenizer.json").write_text("{}")
    for r in range(ranks):
        (root / f"rank{r}.engine").write_bytes(os.urandom(size))
    return root


def upload(store: EngineStore, digest: str, src: Path, tp: int = 2) -> Any:
    return store.upload_engine(digest, src, backend="tensorrt", tp_size=tp, pp_size=1, shapes=SHAPES, provenance=PROV)


def sparse_ish(path: Path, size: int, seed: int) -> None:
    """Mostly holes, with 1 MiB of random data every 32 MiB: every part differs, writing it takes no time."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 32 * MiB):
            f.seek(off)
            f.write(hashlib.sha256(f"{seed}:{off}".encode()).digest() * (MiB // 32))


# -- the multi-GiB round trip ----------------------------------------------------------------------------------------


# 2 GiB takes ~45 s here (the loopback server is disk-bound); LLMENGINE_TEST_ROUNDTRIP_GIB shrinks it on slower
# machines. The 4 GiB run is scripts/bench_store.py.
ROUNDTRIP_BYTES = int(float(os.environ.get("LLMENGINE_TEST_ROUNDTRIP_GIB", "2")) * GiB)


def test_round_trip_of_a_multi_gib_engine_uses_multipart_and_ranged_reads(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "engine"
    src.mkdir()
    (src / "config.json").write_text("{}")
    rank_bytes = ROUNDTRIP_BYTES // 2
    for r in range(2):
        sparse_ish(src / f"rank{r}.engine", rank_bytes, r)
    store = make_store(s3_endpoint, s3_bucket)
    parts = -(-rank_bytes // store.tuning.part_size)
    assert parts >= 4, "too small to exercise multipart"
    ranges: list[str] = []
    store.client.meta.events.register(
        "before-call.s3.GetObject", lambda params, **kw: ranges.append(params.get("headers", {}).get("Range", ""))
    )
    t = time.monotonic()
    manifest = upload(store, "big", src)
    upload_s = time.monotonic() - t
    assert manifest.total_bytes == 2 * rank_bytes + 2
    for f in manifest.files:
        assert f.sha256 == file_sha256(src / f.path)
        if f.size > store.tuning.part_size:  # uploaded in parts: the chaining value at the end of each part
            assert f.part_size == store.tuning.part_size and f.part_sha256 is None and f.part_states is not None
            assert len(f.part_states) == -(-f.size // f.part_size) - 1
            with open(src / f.path, "rb") as fh:  # each part, hashed from the value before it, reaches the next
                for i, (start, end) in enumerate(zip([None, *f.part_states], f.part_states, strict=False)):
                    part = ChainedSha256(start, i * f.part_size)
                    part.update(fh.read(f.part_size))
                    assert part.state() == end
        else:
            assert f.part_sha256 is None and f.part_states is None
    head = store.client.head_object(Bucket=s3_bucket, Key=store.file_key(manifest, "rank0.engine"))
    assert head["ETag"].strip('"').endswith(f"-{parts}"), head["ETag"]  # a multipart object of `parts` parts

    t = time.monotonic()
    got = store.download_engine("big", tmp_path / "down", parallelism=8)
    download_s = time.monotonic() - t
    assert got == manifest
    assert sum(1 for r in ranges if r.startswith("bytes=")) == 2 * parts
    for f in manifest.files:
        assert (tmp_path / "down" / f.path).stat().st_size == f.size
    assert not list((tmp_path / "down").rglob("*.llmengine-partial"))
    print(f"{ROUNDTRIP_BYTES / GiB:g} GiB upload {upload_s:.1f}s, download+verify {download_s:.1f}s")


# -- what a download refuses -----------------------------------------------------------------------------------------


@pytest.fixture
def committed(s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path) -> EngineStore:
    store = make_store(s3_endpoint, s3_bucket, TransferTuning(part_size=5 * MiB, ranged_threshold=5 * MiB))
    upload(store, "eng", small_engine(tmp_path / "src"))
    return store


def _file(store: EngineStore, path: str, digest: str = "eng") -> str:
    manifest = store.get_manifest(digest)
    assert manifest is not None
    return store.file_key(manifest, path)


def test_a_corrupted_byte_is_refused_naming_the_file(committed: EngineStore, tmp_path: Path) -> None:
    key = _file(committed, "rank1.engine")
    data = bytearray(committed.client.get_object(Bucket=committed.location.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    committed.client.put_object(Bucket=committed.location.bucket, Key=key, Body=bytes(data))
    with pytest.raises(IntegrityError) as exc:
        committed.download_engine("eng", tmp_path / "out")
    assert exc.value.path == "rank1.engine" and "failed verification" in str(exc.value)
    assert not (tmp_path / "out" / "rank1.engine").exists()
    assert not list((tmp_path / "out").rglob("*.llmengine-partial"))


@pytest.mark.parametrize(
    ("code", "says"),
    [(errno.ENOSPC, "1.5 MiB free there (No space left on device)"), (errno.EDQUOT, "over its disk quota")],
)
def test_a_disk_without_room_for_a_file_fails_before_it_is_fetched_naming_it(
    committed: EngineStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, says: str
) -> None:
    """fallocate(2) answering ENOSPC, as a full node disk does for a file larger than its free space (1.5 MiB here),
    or EDQUOT, over a quota."""
    big = {f.path for f in (committed.get_manifest("eng") or pytest.fail("not committed")).files if f.size > MiB}

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        if length > MiB:  # the rank files; the small documents fit
            ctypes.set_errno(code)
            return -1
        return real(fd, mode, offset, length)

    real = files._fallocate()
    monkeypatch.setattr(files, "_fallocate", lambda: fallocate)
    monkeypatch.setattr(files, "free_bytes", lambda fd: 3 * MiB // 2)
    monkeypatch.setattr(engine_store, "free_bytes", lambda fd: 3 * MiB // 2)
    gets: list[str] = []
    committed.client.meta.events.register(
        "before-call.s3.GetObject", lambda params, **kw: gets.append(params["url_path"])
    )
    with pytest.raises(StoreError) as exc:
        committed.download_engine("eng", tmp_path / "out", parallelism=1)
    msg = str(exc.value)
    assert msg.startswith("no room for '") and msg.split("'")[1] in big, msg
    assert f"(3.0 MiB) in {tmp_path / 'out'}: {says}" in msg, msg  # the rank files' 3 MiB + 7 bytes
    assert not any(p.endswith(msg.split("'")[1]) for p in gets)  # not a byte of it was asked for
    assert not list((tmp_path / "out").rglob("*.llmengine-partial"))
    assert not any(p.name in big for p in (tmp_path / "out").rglob("*"))


@pytest.fixture
def in_parts(s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path) -> EngineStore:
    """An engine whose rank files went up in 5 MiB parts (12 MiB + 7 bytes: three parts each)."""
    store = make_store(s3_endpoint, s3_bucket, TransferTuning(part_size=5 * MiB, ranged_threshold=5 * MiB))
    upload(store, "eng", small_engine(tmp_path / "src", size=12 * MiB + 7))
    return store


def _corrupt(store: EngineStore, path: str, at: int, digest: str = "eng") -> None:
    key = _file(store, path, digest)
    data = bytearray(store.client.get_object(Bucket=store.location.bucket, Key=key)["Body"].read())
    data[at] ^= 0x01
    store.client.put_object(Bucket=store.location.bucket, Key=key, Body=bytes(data))


@pytest.mark.parametrize("part", [1, 2, 3])
def test_a_corrupted_byte_in_a_file_uploaded_in_parts_is_refused_naming_the_file_and_part(
    in_parts: EngineStore, tmp_path: Path, part: int
) -> None:
    manifest = in_parts.get_manifest("eng")
    assert manifest is not None
    assert all(f.part_states is not None and len(f.part_states) == 2 for f in manifest.files if "rank" in f.path)
    _corrupt(in_parts, "rank0.engine", (part - 1) * 5 * MiB + 1234)
    what = "SHA-256 chaining value" if part < 3 else "sha256"  # the last part ends at the file's own digest
    with pytest.raises(IntegrityError, match=rf"failed verification: part {part} of 3: {what} ") as exc:
        in_parts.download_engine("eng", tmp_path / "out")
    assert exc.value.path == "rank0.engine"
    assert not (tmp_path / "out" / "rank0.engine").exists()
    assert not list((tmp_path / "out").rglob("*.llmengine-partial"))


def test_an_engine_committed_without_part_digests_is_verified_whole(in_parts: EngineStore, tmp_path: Path) -> None:
    """A manifest written before part digests existed: each file's SHA-256, hashed in order, still decides."""
    manifest = in_parts.get_manifest("eng")
    assert manifest is not None
    old = manifest.model_copy(
        update={"files": [f.model_copy(update={"part_size": None, "part_states": None}) for f in manifest.files]}
    )
    bucket = in_parts.location.bucket
    in_parts.client.put_object(Bucket=bucket, Key=in_parts.key("eng", "manifest.json"), Body=old.to_json().encode())
    assert (
        "partStates"
        not in in_parts.client.get_object(Bucket=bucket, Key=in_parts.key("eng", "manifest.json"))["Body"]
        .read()
        .decode()
    )
    assert in_parts.download_engine("eng", tmp_path / "good") == old
    for f in old.files:
        assert file_sha256(tmp_path / "good" / f.path) == f.sha256
    _corrupt(in_parts, "rank1.engine", 6 * MiB)
    with pytest.raises(IntegrityError, match="failed verification: sha256") as exc:
        in_parts.download_engine("eng", tmp_path / "bad")
    assert exc.value.path == "rank1.engine"


def test_without_chaining_values_each_part_gets_a_digest_and_chained_engines_are_hashed_whole(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where OpenSSL's SHA-256 chaining values cannot be read: uploads hash each part on its own as well
    (`partSha256`), and an engine committed with chaining values is verified by its files' SHA-256, in order."""
    store = make_store(s3_endpoint, s3_bucket, TransferTuning(part_size=5 * MiB, ranged_threshold=5 * MiB))
    chained = upload(store, "a", small_engine(tmp_path / "a", size=12 * MiB + 7))
    monkeypatch.setattr(chain, "AVAILABLE", False)
    src = small_engine(tmp_path / "b", size=12 * MiB + 7)
    plain = upload(store, "b", src)
    for f in plain.files:
        if "rank" in f.path:
            assert f.part_states is None and f.part_sha256 is not None
            with open(src / f.path, "rb") as fh:
                assert f.part_sha256 == [hashlib.sha256(fh.read(5 * MiB)).hexdigest() for _ in range(3)]
    assert store.download_engine("b", tmp_path / "b-out") == plain
    assert store.download_engine("a", tmp_path / "a-out") == chained
    _corrupt(store, "rank0.engine", 6 * MiB, digest="a")
    with pytest.raises(IntegrityError, match="failed verification: sha256") as exc:
        store.download_engine("a", tmp_path / "a-bad")
    assert exc.value.path == "rank0.engine"


def test_a_file_that_changes_while_uploading_fails_the_upload(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    """Its whole-file digest and its parts' would be of different bytes: nothing is committed."""
    from llmengine.clients.store.progress import Progress

    store = make_store(s3_endpoint, s3_bucket, TransferTuning(part_size=5 * MiB, ranged_threshold=5 * MiB))
    src = small_engine(tmp_path / "src", ranks=1, size=12 * MiB)
    target = src / "rank0.engine"

    class Touching(Progress):
        def add(self, n: int) -> None:
            super().add(n)
            st = target.stat()
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # written to, in place

    with pytest.raises(StoreError, match="changed while uploading"):
        store.upload_file(target, store.key("eng", "rank0.engine"), Touching(None, "upload", 12 * MiB, 3600))


def test_a_file_cut_short_while_uploading_fails_the_upload_as_a_change(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut mid-block before the in-order hash reaches the cut: the upload says the file changed (a StoreError, which
    the builder reports as a failed upload), not that a chaining value fell mid-block."""
    from llmengine.clients.store import engine_store

    store = make_store(s3_endpoint, s3_bucket, TransferTuning(part_size=5 * MiB, ranged_threshold=5 * MiB))
    target = small_engine(tmp_path / "src", ranks=1, size=12 * MiB) / "rank0.engine"
    hash_range = engine_store.hash_range

    def cut_first(fd: int, offset: int, length: int, sha: Any, buf: Any = None) -> int:
        if offset == 0:
            os.truncate(target, 3 * MiB + 5)
        return hash_range(fd, offset, length, sha, buf)

    monkeypatch.setattr(engine_store, "hash_range", cut_first)
    with pytest.raises(StoreError, match="changed size while uploading"):
        store.upload_file(target, store.key("eng", "rank0.engine"))
    assert store.get_manifest("eng") is None


def _crc32c(data: bytes) -> bytes:
    """CRC32C by the bit, straight from its definition (reflected polynomial 0x82F63B78): no library's."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return (crc ^ 0xFFFFFFFF).to_bytes(4, "big")


@pytest.mark.parametrize("setting", ["crc32c", "none"])
def test_every_part_goes_up_with_the_crc32c_of_the_bytes_hashed_and_the_store_checked_it(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path, setting: str
) -> None:
    """The store's own checksum of the object: with crc32c, the composite of the parts' CRC32Cs (the store computed
    each as the part landed, and took the part only if it matched ours); with none, not a CRC32C at all."""
    import base64

    tuning = TransferTuning.from_env({"LLMENGINE_S3_PART_CHECKSUM": setting})
    store = make_store(s3_endpoint, s3_bucket, dataclasses.replace(tuning, part_size=5 * MiB, retry_seconds=0))
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(12 * MiB + 5)  # three parts, the last one short
    (src / "rank0.engine").write_bytes(data)
    (src / "config.json").write_bytes(b'{"x": 1}')  # one PUT
    (src / "empty.json").write_bytes(b"")
    manifest = upload(store, f"crc-{setting}", src, tp=1)
    big = store.client.head_object(
        Bucket=s3_bucket, Key=store.file_key(manifest, "rank0.engine"), ChecksumMode="ENABLED"
    )
    small = store.client.head_object(
        Bucket=s3_bucket, Key=store.file_key(manifest, "config.json"), ChecksumMode="ENABLED"
    )
    empty = store.client.head_object(
        Bucket=s3_bucket, Key=store.file_key(manifest, "empty.json"), ChecksumMode="ENABLED"
    )
    if setting == "none":
        assert "ChecksumCRC32C" not in big and "ChecksumCRC32C" not in small and "ChecksumCRC32C" not in empty
    else:
        # The parts' CRC32Cs as the upload takes them (1 MiB reads); the store's composite is its own CRC of them.
        parts = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
        crcs = [files.Crc32c() for _ in parts]
        for crc, part in zip(crcs, parts, strict=True):
            for i in range(0, len(part), MiB):
                crc.update(part[i : i + MiB])
        assert _crc32c(b"123456789") == bytes.fromhex("e3069283")  # the definition's check value
        composite = _crc32c(b"".join(c.value.to_bytes(4, "big") for c in crcs))
        assert big["ChecksumCRC32C"] == base64.b64encode(composite).decode() + "-3"
        assert small["ChecksumCRC32C"] == base64.b64encode(_crc32c(b'{"x": 1}')).decode()
        assert empty["ChecksumCRC32C"] == "AAAAAA=="
    assert store.download_engine(f"crc-{setting}", tmp_path / "down") == manifest


@pytest.mark.parametrize("times", [1, 2])
def test_a_part_that_reaches_the_store_changed_is_refused_there_and_sent_again_once(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, times: int
) -> None:
    """A byte of part 2 flipped on the way (after the hash read the file): the store refuses the part (BadDigest),
    the part goes up again from the file; flipped on both sends, the upload fails naming the part and nothing is
    left in the store."""
    store = make_store(s3_endpoint, s3_bucket, TransferTuning(part_size=5 * MiB, ranged_threshold=5 * MiB))
    src = small_engine(tmp_path / "src", ranks=1, size=12 * MiB)
    read = files.FilePart.read
    flipped: list[int] = []

    def flip_once_per_send(self: files.FilePart, n: int | None = -1) -> memoryview:
        view = read(self, n)
        if self._offset == 5 * MiB and self._pos == len(view) and len(flipped) < times:  # part 2's first block
            flipped.append(1)
            view[0] ^= 0xFF
        return view

    monkeypatch.setattr(files.FilePart, "read", flip_once_per_send)
    if times == 1:
        manifest = upload(store, "flip", src, tp=1)
        assert len(flipped) == 1
        assert store.download_engine("flip", tmp_path / "down") == manifest
        assert (tmp_path / "down" / "rank0.engine").read_bytes() == (src / "rank0.engine").read_bytes()
        return
    with pytest.raises(
        StoreError,
        match=r"part 2 of rank0.engine reached the store different from the bytes hashed "
        r"for the manifest, twice \(BadDigest\)",
    ):
        upload(store, "flip", src, tp=1)
    assert len(flipped) == 2
    assert store.get_manifest("flip") is None
    assert not store.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    # the build's directory holds the files that went up before (config.json), never the refused one
    assert not [k for k in store.list_objects(store.key("flip", "")) if k.endswith("rank0.engine")]


def test_a_part_that_fails_stops_the_hash_and_the_upload_at_once(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part 1 fails for good: the file's hash stops (a 140 GB file is not read to its end first), the parts queued
    behind it never go up, and the upload is aborted."""
    import threading

    store = make_store(
        s3_endpoint, s3_bucket, TransferTuning(part_size=5 * MiB, ranged_threshold=5 * MiB, concurrency=1)
    )
    target = small_engine(tmp_path / "src", ranks=1, size=40 * MiB) / "rank0.engine"  # 8 parts
    put_part, note_failure, hash_range = EngineStore._put_part, engine_store._note_failure, engine_store.hash_range
    part1_failed = threading.Event()
    hashed: list[int] = []
    sent: list[int] = []

    def failing_put(self: EngineStore, up: Any, *a: Any) -> Any:
        sent.append(up.number)
        if up.number == 1:
            raise StoreError("part 1 refused for good")
        return put_part(self, up, *a)

    def noting(failed: Any, fut: Any) -> None:
        note_failure(failed, fut)
        part1_failed.set()

    def counted(fd: int, offset: int, length: int, sha: Any, buf: Any = None) -> int:
        hashed.append(offset)
        if offset >= 2 * 5 * MiB:  # the third part waits until part 1 has failed: the next is never hashed
            part1_failed.wait(10)
        return hash_range(fd, offset, length, sha, buf)

    monkeypatch.setattr(EngineStore, "_put_part", failing_put)
    monkeypatch.setattr(engine_store, "_note_failure", noting)
    monkeypatch.setattr(engine_store, "hash_range", counted)
    with pytest.raises(StoreError, match="part 1 refused for good"):
        store.upload_file(target, store.key("eng", "rank0.engine"))
    assert part1_failed.is_set()
    assert len(hashed) <= 3, hashed  # of 8 parts
    assert len(sent) <= 3, sent
    assert not store.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_a_truncated_object_is_refused(committed: EngineStore, tmp_path: Path) -> None:
    key = _file(committed, "rank0.engine")
    data = committed.client.get_object(Bucket=committed.location.bucket, Key=key)["Body"].read()
    committed.client.put_object(Bucket=committed.location.bucket, Key=key, Body=data[:-1000])
    with pytest.raises(IntegrityError, match="truncated or replaced") as exc:
        committed.download_engine("eng", tmp_path / "out")
    assert exc.value.path == "rank0.engine"


def test_a_missing_manifest_means_not_committed(committed: EngineStore, tmp_path: Path) -> None:
    committed.client.delete_object(Bucket=committed.location.bucket, Key=committed.key("eng", "manifest.json"))
    assert not committed.is_committed("eng") and committed.get_manifest("eng") is None
    with pytest.raises(IntegrityError, match=r"is not committed: no manifest.json"):
        committed.download_engine("eng", tmp_path / "out")


def test_a_manifest_listing_an_absent_file_is_refused(committed: EngineStore, tmp_path: Path) -> None:
    committed.client.delete_object(Bucket=committed.location.bucket, Key=_file(committed, "tokenizer.json"))
    with pytest.raises(IntegrityError, match=r"'tokenizer.json' is listed in the manifest but missing") as exc:
        committed.download_engine("eng", tmp_path / "out")
    assert exc.value.path == "tokenizer.json"


def test_a_malformed_manifest_raises_a_clear_error(committed: EngineStore) -> None:
    key = committed.key("eng", "manifest.json")
    committed.client.put_object(Bucket=committed.location.bucket, Key=key, Body=b'{"kind": "EngineManifest"}')
    with pytest.raises(ManifestInvalid, match=r"manifest at s3://.*/eng/manifest.json is malformed"):
        committed.get_manifest("eng")


def test_a_foreign_file_in_the_engine_dir_is_refused_and_good_files_are_kept(
    committed: EngineStore, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    committed.download_engine("eng", out)
    before = (out / "rank0.engine").stat().st_mtime_ns
    committed.download_engine("eng", out)  # a restarted init container: files verified, not fetched again
    assert (out / "rank0.engine").stat().st_mtime_ns == before
    (out / "rank7.engine").write_bytes(b"stale")
    with pytest.raises(IntegrityError, match=r"'rank7.engine' in .* is not part of engine eng"):
        committed.download_engine("eng", out)


def test_delete_uncommits_first(committed: EngineStore) -> None:
    manifest = committed.get_manifest("eng")
    assert manifest is not None and manifest.files_prefix.startswith("builds/")
    committed.put_result("eng", BuildResult(engine_digest="eng", succeeded=True), manifest.files_prefix)
    assert committed.get_result("eng", manifest.files_prefix) is not None
    assert committed.delete_engine("eng") >= 5
    assert not committed.is_committed("eng")
    assert committed.list_objects(committed.location.engine_prefix("eng")) == {}


# -- two builds of one engine at once ----------------------------------------------------------------------------------


def test_racing_builds_commit_one_engine_and_never_touch_its_files(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    """Two builders of the same identity (two namespaces, two clusters on one bucket) with different bytes, as
    trtllm-build writes: both upload at once, one commits, the other's files go, the committed files stay intact."""
    import threading

    stores = [make_store(s3_endpoint, s3_bucket) for _ in range(2)]
    sources = [small_engine(tmp_path / f"src{i}", size=2 * MiB + i) for i in range(2)]
    go = threading.Barrier(2)
    got: list[Any] = [None, None]

    def build(i: int) -> None:
        go.wait()
        got[i] = upload(stores[i], "race", sources[i])

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] == got[1], "both builders must end with the one committed manifest"
    manifest = stores[0].get_manifest("race")
    assert manifest == got[0] and manifest.build_id
    winner = next(i for i in range(2) if (sources[i] / "rank0.engine").stat().st_size == manifest.files[-2].size)
    listed = stores[0].list_objects(stores[0].location.engine_prefix("race"))
    assert all(k.startswith(stores[0].key("race", manifest.files_prefix)) or k.endswith(".json") for k in listed)
    out = tmp_path / "out"
    stores[1].download_engine("race", out)
    for f in manifest.files:
        assert file_sha256(out / f.path) == file_sha256(sources[winner] / f.path) == f.sha256

    # The server enforces conditional writes (so the first commit won, not the last): a second one is refused.
    import botocore.exceptions

    with pytest.raises(botocore.exceptions.ClientError) as refused:
        stores[0].client.put_object(
            Bucket=s3_bucket, Key=stores[0].key("race", "manifest.json"), Body=b"{}", IfNoneMatch="*"
        )
    assert refused.value.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict")

    # A late builder (the commit is long there) uploads and finds it: the committed engine is not modified.
    late = upload(stores[1], "race", small_engine(tmp_path / "late", size=2 * MiB + 5))
    assert late == manifest and stores[0].get_manifest("race") == manifest
    assert stores[0].list_objects(stores[0].location.engine_prefix("race")) == listed


def test_a_store_without_conditional_writes_still_commits_whole_engines(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    """The documented fallback: a store that answers NotImplemented to If-None-Match gets a plain write."""
    import botocore.exceptions

    store = make_store(s3_endpoint, s3_bucket)
    refused: list[str] = []

    def no_conditions(params: dict[str, Any], **_: Any) -> None:
        if params.get("headers", {}).get("If-None-Match"):
            refused.append(params["url_path"])
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "NotImplemented", "Message": "conditional writes"}}, "PutObject"
            )

    store.client.meta.events.register("before-call.s3.PutObject", no_conditions)
    manifest = upload(store, "plain", small_engine(tmp_path / "src"))
    assert refused and store.get_manifest("plain") == manifest
    store.download_engine("plain", tmp_path / "out")


def test_download_prefix_fetches_a_checkpoint(s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path) -> None:
    client = s3_endpoint.client()
    for name, body in {"tiny/config.json": b"{}", "tiny/sub/model.safetensors": os.urandom(6 * MiB)}.items():
        client.put_object(Bucket=s3_bucket, Key=name, Body=body)
    store = make_store(s3_endpoint, s3_bucket, TransferTuning(part_size=5 * MiB, ranged_threshold=5 * MiB))
    assert store.download_prefix("tiny", tmp_path / "m") == 6 * MiB + 2
    assert (tmp_path / "m" / "sub" / "model.safetensors").stat().st_size == 6 * MiB
    with pytest.raises(StoreError, match="no objects under"):
        store.download_prefix("nothing/", tmp_path / "n")


# -- one-line errors -----------------------------------------------------------------------------------------------


def test_wrong_credentials(s3_endpoint: S3Endpoint, s3_bucket: str) -> None:
    bad = S3Endpoint(s3_endpoint.endpoint, s3_endpoint.access_key, "not-the-secret")
    with pytest.raises(CredentialsError) as exc:
        make_store(bad, s3_bucket, max_attempts=1).is_committed("x")
    assert str(exc.value) == (
        "S3 rejected the credentials (SignatureDoesNotMatch): check the secret named in spec.store.credentialsSecretRef"
    )
    unknown = S3Endpoint(s3_endpoint.endpoint, "nobody", s3_endpoint.secret_key)
    # AWS says InvalidAccessKeyId; versitygw names its own code. Either way: the credentials setting.
    with pytest.raises(
        CredentialsError, match=r"S3 rejected the credentials \((InvalidAccessKeyId|XAdminUserNotFound)\)"
    ):
        make_store(unknown, s3_bucket, max_attempts=1).is_committed("x")


def test_missing_bucket(s3_endpoint: S3Endpoint) -> None:
    with pytest.raises(BucketNotFound) as exc:
        make_store(s3_endpoint, "no-such-bucket-here").is_committed("x")
    assert str(exc.value) == (
        f"bucket 'no-such-bucket-here' does not exist at {s3_endpoint.endpoint}: create it or fix spec.store.bucket"
    )
    assert exc.value.setting == "spec.store.bucket"


def test_unreachable_endpoint() -> None:
    url = f"http://127.0.0.1:{proc.free_port()}"
    dead = S3Endpoint(url, "k", "s")
    t = time.monotonic()
    with pytest.raises(EndpointUnreachable) as exc:
        make_store(dead, "b", max_attempts=1, connect_timeout=1).get_manifest("x")
    assert str(exc.value) == f"cannot reach S3 endpoint {url}: check spec.store.endpoint"
    assert time.monotonic() - t < 10
