"""Store logic that needs no server: error mapping, manifest path rules, config hygiene, tuning."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import pytest
from botocore import exceptions as bx

from llmengine.api.artifacts import ManifestFile
from llmengine.clients.store import (
    AccessDenied,
    BucketNotFound,
    CredentialsError,
    EndpointUnreachable,
    IntegrityError,
    S3Config,
    StoreError,
    TransferTuning,
    UntrustedCertificate,
    _ranges,
    check_manifest_paths,
    is_transient,
    translate_error,
)

EP = "http://s3.example:9000"
MiB = 1024 * 1024


def client_error(code: str, message: str = "boom") -> bx.ClientError:
    return bx.ClientError({"Error": {"Code": code, "Message": message}}, "GetObject")


@pytest.mark.parametrize(
    ("exc", "cls", "message", "setting"),
    [
        (
            client_error("InvalidAccessKeyId"),
            CredentialsError,
            "S3 rejected the credentials (InvalidAccessKeyId): check the secret named in "
            "spec.store.credentialsSecretRef",
            "spec.store.credentialsSecretRef",
        ),
        (
            client_error("SignatureDoesNotMatch"),
            CredentialsError,
            "S3 rejected the credentials (SignatureDoesNotMatch): check the secret named in "
            "spec.store.credentialsSecretRef",
            "spec.store.credentialsSecretRef",
        ),
        (
            client_error("NoSuchBucket"),
            BucketNotFound,
            f"bucket 'engines' does not exist at {EP}: create it or fix spec.store.bucket",
            "spec.store.bucket",
        ),
        (
            bx.EndpointConnectionError(endpoint_url=EP),
            EndpointUnreachable,
            f"cannot reach S3 endpoint {EP}: check spec.store.endpoint",
            "spec.store.endpoint",
        ),
        (
            bx.ConnectTimeoutError(endpoint_url=EP),
            EndpointUnreachable,
            f"cannot reach S3 endpoint {EP}: check spec.store.endpoint",
            "spec.store.endpoint",
        ),
        (
            client_error("AccessDenied"),
            AccessDenied,
            "S3 denied access to bucket 'engines' (AccessDenied): grant the credentials in "
            "spec.store.credentialsSecretRef read/write on it",
            "spec.store.credentialsSecretRef",
        ),
        (
            bx.NoCredentialsError(),
            CredentialsError,
            "no S3 credentials found: set spec.store.credentialsSecretRef or configure workload identity",
            "spec.store.credentialsSecretRef",
        ),
        (
            client_error("SlowDown", "Please\nreduce\nyour rate"),
            StoreError,
            f"S3 error SlowDown at {EP}: Please reduce your rate",
            None,
        ),
    ],
)
def test_errors_map_to_one_line_messages_naming_the_setting(
    exc: Exception, cls: type[StoreError], message: str, setting: str | None
) -> None:
    err = translate_error(exc, EP, "engines")
    assert type(err) is cls and str(err) == message and err.setting == setting
    assert "\n" not in str(err)


def test_an_untrusted_certificate_names_the_ca_bundle_settings() -> None:
    exc = bx.SSLError(endpoint_url="https://s3.corp:9000", error="[SSL: CERTIFICATE_VERIFY_FAILED] self-signed")
    err = translate_error(exc, "https://s3.corp:9000", "engines")
    assert isinstance(err, UntrustedCertificate) and err.setting == "spec.pods.caBundle"
    assert str(err).startswith("the TLS certificate of S3 endpoint https://s3.corp:9000 is not trusted (")
    assert "CERTIFICATE_VERIFY_FAILED" in str(err) and "enginePods.caBundle" in str(err)
    assert not is_transient(err)


def test_a_ca_bundle_is_what_the_client_verifies_with(tmp_path: Any) -> None:
    from llmengine.api.config import OperatorConfig
    from llmengine.clients.store import make_s3_client

    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = OperatorConfig.from_env({"LLMENGINE_CA_BUNDLE": str(ca)})
    assert cfg.ca_bundle == str(ca)
    client = make_s3_client(S3Config(endpoint="https://s3.corp", ca_bundle=cfg.ca_bundle))
    assert client._endpoint.http_session._verify == str(ca)
    assert make_s3_client(S3Config(endpoint="https://s3.corp"))._endpoint.http_session._verify != str(ca)
    assert OperatorConfig.from_env({}).ca_bundle is None


def test_s3_config_never_shows_secrets() -> None:
    cfg = S3Config(endpoint=EP, access_key_id="AKIAEXAMPLE", secret_access_key="s3cr3t-value", session_token="tok")
    text = repr(cfg) + str(cfg)
    assert "s3cr3t-value" not in text and "AKIAEXAMPLE" not in text and "tok'" not in text
    assert EP in text


def test_s3_config_for_location_falls_back_to_env(monkeypatch: Any) -> None:
    from llmengine.api.artifacts import StoreLocation

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://env:1")
    assert S3Config.for_location(StoreLocation(bucket="b")).endpoint == "http://env:1"
    assert S3Config.for_location(StoreLocation(bucket="b", endpoint="http://x:2", region="eu-west-1")) == S3Config(
        endpoint="http://x:2", region="eu-west-1"
    )


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("../etc/passwd", "unexpected entry"),
        ("/abs/rank0.engine", "unexpected entry"),
        ("a//b", "unexpected entry"),
        ("manifest.json", "unexpected entry"),
        ("build-result.json", "unexpected entry"),
        ("", "unexpected entry"),
    ],
)
def test_manifest_entries_must_be_plain_relative_files(path: str, needle: str) -> None:
    with pytest.raises(IntegrityError, match=needle) as exc:
        check_manifest_paths([ManifestFile(path=path, sha256="0" * 64, size=1)])
    assert exc.value.path == path


def test_manifest_entries_must_be_unique_and_well_formed() -> None:
    ok = ManifestFile(path="lora/a.bin", sha256="0" * 64, size=1)
    check_manifest_paths([ok, ManifestFile(path="rank0.engine", sha256="1" * 64, size=0)])
    with pytest.raises(IntegrityError, match="twice"):
        check_manifest_paths([ok, ok])
    with pytest.raises(IntegrityError, match="invalid size or sha256"):
        check_manifest_paths([ManifestFile(path="x", sha256="abc", size=1)])
    # 64 characters are not enough: a digest is lowercase hex, as hashlib writes it (compared as text on download).
    for bad in ("g" * 64, "A" * 64, " " + "a" * 63):
        with pytest.raises(IntegrityError, match="invalid size or sha256"):
            check_manifest_paths([ManifestFile(path="x", sha256=bad, size=1)])


def test_ranges_cover_the_file_exactly() -> None:
    assert _ranges(0, 64) == [(0, 0)]
    assert _ranges(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert sum(n for _, n in _ranges(1000 * MiB + 3, 64 * MiB)) == 1000 * MiB + 3


def test_tuning_from_env() -> None:
    assert TransferTuning.from_env({}) == TransferTuning(retry_seconds=120)
    t = TransferTuning.from_env({"LLMENGINE_S3_PART_SIZE_MIB": "16", "LLMENGINE_S3_CONCURRENCY": "4"})
    assert (t.part_size, t.concurrency, t.ranged_threshold) == (16 * MiB, 4, 16 * MiB)
    assert TransferTuning.from_env({"LLMENGINE_S3_PART_SIZE_MIB": "1"}).part_size == 5 * MiB
    # The builder and the server wait out an unreachable store; the operator's own store (TransferTuning()) does not.
    assert TransferTuning().retry_seconds == 0
    assert TransferTuning.from_env({"LLMENGINE_S3_RETRY_SECONDS": "0"}).retry_seconds == 0  # 0 means off, not unset
    assert TransferTuning.from_env({"LLMENGINE_S3_RETRY_SECONDS": "5"}).retry_seconds == 5


def test_part_checksums_are_crc32c_unless_turned_off_and_a_wrong_value_names_the_variable() -> None:
    assert TransferTuning().part_checksum == TransferTuning.from_env({}).part_checksum == "crc32c"
    assert TransferTuning.from_env({"LLMENGINE_S3_PART_CHECKSUM": " None "}).part_checksum == "none"
    with pytest.raises(StoreError, match=r"LLMENGINE_S3_PART_CHECKSUM='sha256': use crc32c .* or none") as exc:
        TransferTuning.from_env({"LLMENGINE_S3_PART_CHECKSUM": "sha256"})
    assert exc.value.setting == "LLMENGINE_S3_PART_CHECKSUM"


def test_crc32c_is_the_castagnoli_crc_in_the_form_s3_takes() -> None:
    """RFC 3720's check value for "123456789" (0xE3069283), fed in pieces, as the big-endian bytes in base64."""
    from llmengine.clients.store.files import Crc32c

    crc = Crc32c()
    for piece in (b"1234", memoryview(b"56789")):
        crc.update(piece)
    assert crc.value == 0xE3069283
    assert crc.b64() == "4waSgw=="


@pytest.mark.parametrize(
    ("size", "operation", "code", "message"),
    [
        # a multipart upload: the store answers its start (AWS's words for a header it does not implement)
        (
            6 * MiB,
            "create_multipart_upload",
            "NotImplemented",
            "A header you provided implies functionality that is not implemented",
        ),
        # one PUT of a small file
        (1000, "put_object", "InvalidRequest", "Unsupported checksum algorithm: CRC32C"),
    ],
)
def test_a_store_that_refuses_crc32c_checksums_gets_an_error_naming_the_setting_that_turns_them_off(
    tmp_path: Any, size: int, operation: str, code: str, message: str
) -> None:
    from botocore.stub import Stubber

    from llmengine.api.artifacts import StoreLocation
    from llmengine.clients.store import EngineStore, make_s3_client

    client = make_s3_client(S3Config(endpoint=EP, access_key_id="AKIAEXAMPLE", secret_access_key="s3cr3t-value"))
    store = EngineStore(client, StoreLocation(bucket="b"), TransferTuning(part_size=5 * MiB))
    local = tmp_path / "rank0.engine"
    local.write_bytes(os.urandom(size))
    with Stubber(client) as stub:
        stub.add_client_error(operation, service_error_code=code, service_message=message, http_status_code=400)
        with pytest.raises(
            StoreError, match=rf"the store refused the CRC32C checksum of rank0.engine \({code}: "
        ) as exc:
            store.upload_file(local, "k")
        assert "LLMENGINE_S3_PART_CHECKSUM=none" in str(exc.value)
        assert exc.value.setting == "LLMENGINE_S3_PART_CHECKSUM"
        stub.assert_no_pending_responses()


def test_transient_and_permanent_errors_are_told_apart() -> None:
    def status_error(code: str, status: int) -> bx.ClientError:
        return bx.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(bx.EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(bx.ConnectionClosedError(endpoint_url="http://x"))
    assert is_transient(bx.ReadTimeoutError(endpoint_url="http://x"))
    assert is_transient(EndpointUnreachable("cannot reach S3 endpoint http://x: check spec.store.endpoint"))
    assert is_transient(bx.ResponseStreamingError(error="cut"))
    assert is_transient(status_error("SlowDown", 503))
    assert is_transient(status_error("Whatever", 502))
    assert not is_transient(status_error("AccessDenied", 403))
    assert not is_transient(status_error("NoSuchKey", 404))
    assert not is_transient(bx.NoCredentialsError())
    assert not is_transient(bx.SSLError(endpoint_url="https://x", error="bad certificate"))
    assert not is_transient(ValueError("x"))
    # A route that went away under an open connection, as a socket call straight from http.client raises it; a full
    # or failing local disk stays permanent.
    assert is_transient(OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH)))
    assert is_transient(OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH)))
    assert not is_transient(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert not is_transient(OSError(errno.EIO, os.strerror(errno.EIO)))


def test_a_store_error_names_the_settings_the_engine_uses() -> None:
    """An engine with spec.store is pointed at its fields; one on the operator's default store at the chart's values."""
    from llmengine.clients.store import DEFAULT_STORE, translate_error

    failures = [
        bx.EndpointConnectionError(endpoint_url="http://s3:9000"),
        bx.ClientError({"Error": {"Code": "InvalidAccessKeyId"}}, "GetObject"),
        bx.ClientError({"Error": {"Code": "NoSuchBucket"}}, "GetObject"),
        bx.ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"),
        bx.NoCredentialsError(),
    ]
    for exc in failures:
        own = translate_error(exc, "http://s3:9000", "engines")
        default = translate_error(exc, "http://s3:9000", "engines", DEFAULT_STORE)
        assert own.setting is not None and own.setting.startswith("spec.store.") and own.setting in str(own)
        assert "spec.store" not in str(default) and "chart value" in str(default), str(default)
        assert type(own) is type(default)
    reach = translate_error(failures[0], "http://s3:9000", "engines", DEFAULT_STORE)
    assert str(reach) == (
        "cannot reach S3 endpoint http://s3:9000: check the operator's default store (chart value store.endpoint)"
    )


def test_a_file_part_is_read_from_the_file_as_it_is_sent_and_rewinds_for_a_retry(tmp_path: Any) -> None:
    from llmengine.clients.store.files import FilePart

    (tmp_path / "f").write_bytes(b"0123456789")
    with open(tmp_path / "f", "rb") as f:
        body = FilePart(f.fileno(), 2, 6, "f")
        assert len(body) == 6
        assert bytes(body.read(4)) == b"2345" and bytes(body.read(100)) == b"67" and bytes(body.read(1)) == b""
        assert body.tell() == 6 and len(body) == 0
        assert body.seek(0) == 0 and bytes(body.read()) == b"234567"  # what a retried request sends again
        with pytest.raises(OSError, match="ended at 10 bytes"):
            FilePart(f.fileno(), 8, 4, "f").read()  # the file is shorter than the part: never a short part


class _Sent(Exception):
    pass


def test_part_uploads_are_signed_without_hashing_the_body_again() -> None:
    """The manifest's SHA-256 is the body's integrity: the signature covers the request, not a second hash."""
    from llmengine.clients.store import make_s3_client

    client = make_s3_client(S3Config(endpoint=EP, access_key_id="AKIAEXAMPLE", secret_access_key="s3cr3t-value"))
    seen: list[Any] = []

    def capture(request: Any, **_: Any) -> None:
        seen.append(request)
        raise _Sent

    client.meta.events.register("before-send.s3.UploadPart", capture)
    body = b"x" * MiB
    with pytest.raises(_Sent):
        client.upload_part(Bucket="b", Key="k", UploadId="u", PartNumber=1, Body=body)
    headers = seen[0].headers
    assert headers["X-Amz-Content-SHA256"] in (b"UNSIGNED-PAYLOAD", "UNSIGNED-PAYLOAD")
    assert "Signature=" in str(headers["Authorization"]) and int(headers["Content-Length"]) == MiB


def test_a_file_part_hashes_what_it_sends_and_rehashes_when_not_sent_whole(tmp_path: Any) -> None:
    import hashlib

    from llmengine.clients.store.files import FilePart

    data = bytes(range(256)) * 40
    (tmp_path / "f").write_bytes(data)
    want = hashlib.sha256(data[100:5100]).hexdigest()
    with open(tmp_path / "f", "rb") as f:
        sent = FilePart(f.fileno(), 100, 5000, "f")
        while sent.read(1024):
            pass
        assert sent.sha256() == want
        retried = FilePart(f.fileno(), 100, 5000, "f")
        retried.read(3000)
        retried.seek(0)  # a retry sends it again from the start: the first attempt's bytes do not count twice
        while retried.read(700):
            pass
        assert retried.sha256() == want
        skipped = FilePart(f.fileno(), 100, 5000, "f")
        skipped.seek(10)
        skipped.read()  # never sent from its start: the digest comes from the file, not from half the bytes
        assert skipped.sha256() == want
        assert FilePart(f.fileno(), 100, 5000, "f").sha256() == want
        unhashed = FilePart(f.fileno(), 100, 5000, "f", hashed=False)  # the file's chaining values check its parts
        unhashed.read(10)
        unhashed.seek(0)
        assert bytes(unhashed.read()) == data[100:5100]
        with pytest.raises(ValueError, match="without hashing"):
            unhashed.sha256()


@pytest.mark.parametrize(
    ("size", "part_size", "digests", "ok"),
    [
        (10, 4, 3, True),
        (8, 4, 2, True),
        (8, 4, 3, False),  # one digest too many
        (10, 4, 2, False),  # the last 2 bytes covered by none
        (10, 0, 0, False),
        (10, None, 1, False),  # digests without a part size
        (10, 4, None, False),  # a part size without digests
    ],
)
def test_manifest_part_digests_must_cover_the_file_exactly(
    size: int, part_size: int | None, digests: int | None, ok: bool
) -> None:
    entry = ManifestFile(
        path="rank0.engine",
        sha256="0" * 64,
        size=size,
        part_size=part_size,
        part_sha256=None if digests is None else ["1" * 64] * digests,
    )
    if ok:
        check_manifest_paths([entry])
    else:
        with pytest.raises(IntegrityError, match="part checks that do not cover"):
            check_manifest_paths([entry])
    with pytest.raises(IntegrityError, match="part checks"):
        check_manifest_paths([entry.model_copy(update={"part_size": 4, "part_sha256": ["ab"] * 3})])


@pytest.mark.parametrize(
    ("size", "part_size", "states", "ok"),
    [
        (200, 64, 3, True),  # parts of 64, 64, 64, 8 bytes: a chaining value after each but the last
        (128, 64, 1, True),
        (64, 64, 0, True),  # one part: its check is the file's SHA-256
        (200, 64, 4, False),  # one value too many
        (200, 64, 2, False),
        (200, 60, 3, False),  # a part that is not whole SHA-256 blocks has no chaining value at its end
    ],
)
def test_manifest_chaining_values_must_end_every_part_but_the_last(
    size: int, part_size: int, states: int, ok: bool
) -> None:
    entry = ManifestFile(
        path="rank0.engine", sha256="0" * 64, size=size, part_size=part_size, part_states=["2" * 64] * states
    )
    if ok:
        check_manifest_paths([entry])
    else:
        with pytest.raises(IntegrityError, match="part checks that do not cover"):
            check_manifest_paths([entry])
    both = entry.model_copy(update={"part_sha256": ["1" * 64] * -(-size // part_size)})
    with pytest.raises(IntegrityError, match="part checks"):
        check_manifest_paths([both])  # one kind of part check, never two
    with pytest.raises(IntegrityError, match="part checks"):
        check_manifest_paths([entry.model_copy(update={"part_states": ["Z" * 64] * states or ["Z" * 64]})])


class _Response:
    """What http.client leaves when the server closes the connection after 3 of 10 promised bytes."""

    def __init__(self) -> None:
        import http.client
        import io

        class Sock:
            def makefile(self, mode: str) -> Any:
                return io.BufferedReader(io.BytesIO(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))

        self._fp = http.client.HTTPResponse(Sock())  # type: ignore[arg-type]
        self._fp.begin()


def test_a_body_cut_short_raises_a_transient_error_when_read_straight_from_http_client() -> None:
    import http.client

    from llmengine.clients.store.errors import is_transient
    from llmengine.clients.store.receive import body_reader

    class Body:
        _raw_stream = _Response()

    readinto = body_reader(Body())
    buf = memoryview(bytearray(8))
    assert readinto(buf) == 3 and bytes(buf[:3]) == b"abc"
    with pytest.raises(http.client.IncompleteRead) as exc:
        readinto(buf)
    assert is_transient(exc.value)  # the store's retry asks again for the bytes still missing


def test_a_body_without_an_http_client_response_is_read_through_its_read() -> None:
    import io

    from llmengine.clients.store.receive import body_reader

    readinto = body_reader(io.BytesIO(b"0123456789"))
    buf = memoryview(bytearray(4))
    got = []
    while n := readinto(buf):
        got.append(bytes(buf[:n]))
    assert b"".join(got) == b"0123456789"


def test_a_download_file_is_allocated_ahead_where_the_file_system_can_and_sparse_where_it_cannot(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes

    from llmengine.clients.store import files

    size = 8 * 1024 * 1024 + 3
    with open(tmp_path / "a", "wb") as f:
        allocated = files.preallocate(f.fileno(), size)
    st = os.stat(tmp_path / "a")
    assert st.st_size == size
    # What it reports is what happened: blocks for every byte, or none (a file system without fallocate).
    assert allocated == (st.st_blocks * 512 >= size), (allocated, st.st_blocks)
    assert (tmp_path / "a").read_bytes() == bytes(size)

    def refusing(*codes: int) -> Any:
        answers = list(codes)

        def fallocate(*args: Any) -> int:
            calls.append(args[1:])
            if not answers:
                return real(*args)
            ctypes.set_errno(answers.pop(0))
            return -1

        return lambda: fallocate

    real = files._fallocate()
    assert real is not None  # Linux with glibc, as the images and CI are
    calls: list[tuple[int, ...]] = []
    # Cannot allocate ahead (the file system; a seccomp profile): a sparse file instead.
    for code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EACCES):
        monkeypatch.setattr(files, "_fallocate", refusing(code))
        with open(tmp_path / "b", "wb") as f:
            assert files.preallocate(f.fileno(), size) is False
        assert os.stat(tmp_path / "b").st_size == size and os.stat(tmp_path / "b").st_blocks == 0
    assert calls == [(0, 0, size)] * 5  # mode 0: allocate and set the size
    calls.clear()
    monkeypatch.setattr(files, "_fallocate", refusing(errno.EINTR, errno.EINTR))  # interrupted twice: asked again
    with open(tmp_path / "i", "wb") as f:
        assert files.preallocate(f.fileno(), size) is allocated
    assert len(calls) == 3 and os.stat(tmp_path / "i").st_size == size
    # No room (the file system says less than the file is free), over a quota, a failing disk: an error, not a sparse
    # file to fill later.
    monkeypatch.setattr(files, "free_bytes", lambda fd: size - 1)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        monkeypatch.setattr(files, "_fallocate", refusing(code))
        with open(tmp_path / "c", "wb") as f, pytest.raises(OSError) as exc:
            files.preallocate(f.fileno(), size)
        assert exc.value.errno == code
    # ENOSPC with room for the file (OpenZFS imitates the call and wants 110 % of the size free): a sparse file, so
    # that a download that fits does not fail.
    monkeypatch.setattr(files, "free_bytes", lambda fd: size)
    monkeypatch.setattr(files, "_fallocate", refusing(errno.ENOSPC))
    with open(tmp_path / "z", "wb") as f:
        assert files.preallocate(f.fileno(), size) is False
    assert os.stat(tmp_path / "z").st_size == size and os.stat(tmp_path / "z").st_blocks == 0
    monkeypatch.undo()
    with open(tmp_path / "f", "wb") as f:  # what statvfs says is free here: at least what the test files took
        assert files.free_bytes(f.fileno()) >= size
    calls.clear()
    with open(tmp_path / "d", "wb") as f:
        assert files.preallocate(f.fileno(), 0) is False and not calls  # nothing to allocate
    monkeypatch.setattr(files, "_fallocate", lambda: None)  # not Linux, or a libc without fallocate
    with open(tmp_path / "e", "wb") as f:
        assert files.preallocate(f.fileno(), size) is False
    assert os.stat(tmp_path / "e").st_size == size


def test_without_awscrt_an_upload_fails_before_any_request_naming_both_fixes(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's image does not install awscrt; an upload that would need it says what to install or set."""
    from botocore.stub import Stubber

    from llmengine.api.artifacts import StoreLocation
    from llmengine.clients.store import EngineStore, files, make_s3_client

    monkeypatch.setitem(sys.modules, "awscrt.checksums", None)  # import fails
    files.crc32c_function.cache_clear()
    client = make_s3_client(S3Config(endpoint=EP, access_key_id="AKIAEXAMPLE", secret_access_key="s3cr3t-value"))
    store = EngineStore(client, StoreLocation(bucket="b"), TransferTuning(part_size=5 * MiB))
    local = tmp_path / "rank0.engine"
    local.write_bytes(os.urandom(6 * MiB))
    try:
        with (
            Stubber(client),
            pytest.raises(StoreError, match=r"need the awscrt package .*\[builder\].*or set LLMENGINE"),
        ):
            store.upload_file(local, "k")  # the Stubber refuses any request: none is sent
        none = EngineStore(client, StoreLocation(bucket="b"), TransferTuning(part_size=5 * MiB, part_checksum="none"))
        with Stubber(client) as stub:
            stub.add_response("put_object", {"ETag": '"e"'}, {"Bucket": "b", "Key": "small", "Body": b"abc"})
            (tmp_path / "small").write_bytes(b"abc")
            assert none.upload_file(tmp_path / "small", "small").size == 3  # without checksums it needs none
    finally:
        files.crc32c_function.cache_clear()


@pytest.mark.parametrize(
    ("code", "message", "header", "refused"),
    [
        ("NotImplemented", "A header you provided implies functionality that is not implemented", None, True),
        ("NotImplemented", "A header you provided implies functionality …", "x-amz-checksum-crc32c", True),
        ("XNotImplemented", "The request you provided implies functionality that is not implemented", None, True),
        ("InvalidRequest", "Unsupported checksum algorithm: CRC32C", None, True),
        ("InvalidArgument", "checksum algorithm not supported", None, True),
        # another header not implemented: not the checksum's doing
        ("NotImplemented", "A header you provided implies functionality …", "Transfer-Encoding", False),
        # checksums the store implements, sent wrong: turning them off would hide the fault
        ("InvalidRequest", "Value for x-amz-checksum-crc32c header is invalid.", None, False),
        ("InvalidRequest", "Checksum Type mismatch occurred, expected checksum Type: CRC32C", None, False),
        ("InvalidArgument", "Part number must be an integer between 1 and 10000", None, False),
        ("AccessDenied", "checksum not supported", None, False),
    ],
)
def test_a_refusal_of_crc32c_is_told_from_other_errors(
    code: str, message: str, header: str | None, refused: bool
) -> None:
    from llmengine.clients.store.errors import refuses_checksums

    error: dict[str, str] = {"Code": code, "Message": message, **({"Header": header} if header else {})}
    exc = bx.ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}, "UploadPart")  # type: ignore[typeddict-item]
    assert refuses_checksums(exc) is refused


@pytest.mark.parametrize("echo", [None, "AAAAAA=="])
def test_a_store_that_does_not_repeat_the_crc32c_sent_is_noted_or_refused(tmp_path: Any, echo: str | None) -> None:
    """The store's answer repeats the checksum it checked. Without one it may not check: logged once, the upload
    goes on (every download verifies the SHA-256). A different one: it computed something else, and the upload
    fails naming the setting."""
    import structlog.testing
    from botocore.stub import Stubber

    from llmengine.api.artifacts import StoreLocation
    from llmengine.clients.store import EngineStore, make_s3_client

    client = make_s3_client(S3Config(endpoint=EP, access_key_id="AKIAEXAMPLE", secret_access_key="s3cr3t-value"))
    store = EngineStore(client, StoreLocation(bucket="b"), TransferTuning(part_size=5 * MiB))
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").write_bytes(b"def")
    answer = {"ETag": '"e"', **({"ChecksumCRC32C": echo} if echo else {})}
    with Stubber(client) as stub, structlog.testing.capture_logs() as logs:
        stub.add_response("put_object", answer)
        stub.add_response("put_object", answer)
        if echo is None:
            assert store.upload_file(tmp_path / "a", "a").size == 3
            assert store.upload_file(tmp_path / "b", "b").size == 3
            notes = [e for e in logs if "does not confirm CRC32C" in e["event"]]
            assert len(notes) == 1 and notes[0]["first"] == "a"
        else:
            # CRC32C("abc") is 0x364B3FB7, as versitygw computes it too
            with pytest.raises(StoreError, match=r"took a with CRC32C AAAAAA==, not the Nks/tw== sent") as exc:
                store.upload_file(tmp_path / "a", "a")
            assert exc.value.setting == "LLMENGINE_S3_PART_CHECKSUM"
