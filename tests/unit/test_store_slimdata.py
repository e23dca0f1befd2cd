"""botocore's data cut to the store's S3 calls: every call the package makes is in it, and a client on it sends the
same requests to the same endpoints as a client on botocore's full data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import boto3
import botocore
import botocore.session
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from llmengine.clients.store import S3Config, slimdata
from llmengine.clients.store import client as store_client

PACKAGE = Path(slimdata.__file__).resolve().parents[2]
# boto3's own methods on an S3 client, by the operations they send.
BOTO3_METHODS = {"download_file": {"HeadObject", "GetObject"}}


class EmptyBody:
    def stream(self, **_: Any) -> Any:
        return iter([b""])


@pytest.fixture(scope="module")
def slim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slimdata.write(tmp_path_factory.mktemp("botocore-data"))


def session(slim: Path | None) -> boto3.session.Session:
    core = botocore.session.get_session()
    if slim is not None:
        slimdata.apply(core, slim)
    return boto3.session.Session(botocore_session=core)


def s3(slim: Path | None, region: str = "us-east-1", endpoint: str | None = None, **config: Any) -> Any:
    return session(slim).client(
        "s3",
        region_name=region,
        endpoint_url=endpoint,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        config=Config(**config),
    )


def called_operations() -> dict[str, set[str]]:
    """S3 operations the package's source calls, by where: `client.<method>(`, `get_paginator("<method>")`,
    `generate_presigned_url("<method>"`."""
    full = botocore.session.get_session().get_service_model("s3")
    by_method = {botocore.xform_name(op): op for op in full.operation_names}
    calls = re.compile(r'client\.([a-z_0-9]+)\(\s*(?:"([a-z_0-9]+)")?')
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for m in calls.finditer(path.read_text()):
            method, named = m.groups()
            if method in ("get_paginator", "generate_presigned_url"):
                method = named
            ops = {by_method[method]} if method in by_method else BOTO3_METHODS.get(method, set())
            for op in ops:
                found.setdefault(op, set()).add(str(path.relative_to(PACKAGE)))
    return found


def test_every_s3_operation_the_package_calls_is_in_the_slim_data(slim: Path) -> None:
    called = called_operations()
    # The scan finds the store's calls (if it found nothing, it would prove nothing).
    assert {"PutObject", "GetObject", "ListObjectsV2", "UploadPart", "DeleteObjects"} <= set(called)
    missing = {op: sorted(where) for op, where in called.items() if op not in slimdata.OPERATIONS}
    assert not missing, f"add these to slimdata.OPERATIONS: {missing}"
    assert set(s3(slim).meta.service_model.operation_names) == set(slimdata.OPERATIONS)


def test_the_slim_model_resolves_every_shape_and_is_much_smaller(slim: Path) -> None:
    model = s3(slim).meta.service_model
    seen: set[str] = set()

    def walk(shape: Any) -> None:
        if shape is None or shape.name in seen:
            return
        seen.add(shape.name)
        for member in getattr(shape, "members", {}).values():
            walk(member)
        for attr in ("member", "key", "value"):
            walk(getattr(shape, attr, None))

    for op in model.operation_names:
        o = model.operation_model(op)
        walk(o.input_shape)
        walk(o.output_shape)
    assert seen
    full = (Path(botocore.__file__).parent / "data" / "endpoints.json").stat().st_size
    assert (slim / "endpoints.json").stat().st_size < full / 20


@pytest.mark.parametrize(
    ("region", "endpoint"),
    [
        ("us-east-1", None),
        ("eu-west-1", None),
        ("us-gov-west-1", None),
        ("cn-north-1", None),
        ("ap-southeast-2", None),
        ("us-east-1", "http://127.0.0.1:9000"),
        ("eu-central-1", "https://minio.example.internal"),
    ],
)
def test_requests_are_the_same_as_on_botocores_full_data(slim: Path, region: str, endpoint: str | None) -> None:
    def requests(data: Path | None) -> list[tuple[str, str, dict[str, str], bytes]]:
        client = s3(data, region, endpoint, s3={"addressing_style": "path", "payload_signing_enabled": False})
        sent: list[tuple[str, str, dict[str, str], bytes]] = []

        def capture(request: Any, **_: Any) -> AWSResponse:
            skip = {"authorization", "x-amz-date", "amz-sdk-invocation-id", "user-agent", "amz-sdk-request"}
            headers = {k.lower(): str(v) for k, v in request.headers.items() if k.lower() not in skip}
            body = request.body if isinstance(request.body, bytes) else b""
            sent.append((request.method, request.url, headers, body))
            return AWSResponse(request.url, 200, {}, EmptyBody())

        client.meta.events.register("before-send.s3", capture)
        b = "engines"
        client.put_object(Bucket=b, Key="e/abc/manifest.json", Body=b"{}", IfNoneMatch="*")
        client.head_object(Bucket=b, Key="e/abc/manifest.json")
        client.delete_object(Bucket=b, Key="e/abc/manifest.json")
        client.create_multipart_upload(Bucket=b, Key="e/abc/rank0.engine")
        client.abort_multipart_upload(Bucket=b, Key="e/abc/rank0.engine", UploadId="u1")
        client.delete_objects(Bucket=b, Delete={"Objects": [{"Key": "e/abc/a"}, {"Key": "e/abc/b"}]})
        client.upload_part(Bucket=b, Key="e/abc/rank0.engine", UploadId="u1", PartNumber=3, Body=b"x" * 10)
        client.complete_multipart_upload(
            Bucket=b, Key="e/k", UploadId="u1", MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"e1"'}]}
        )
        client.list_objects_v2(Bucket=b, Prefix="e/abc/", ContinuationToken="t")
        client.get_object(Bucket=b, Key="e/abc/rank0.engine", Range="bytes=0-9")
        url = client.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "e/abc/x"}, ExpiresIn=60)
        sent.append(("PRESIGN", url.split("?")[0], {}, b""))
        return sent

    full, cut = requests(None), requests(slim)
    assert len(full) == len(slimdata.OPERATIONS) + 1  # every operation, and the presigned GET
    assert cut == full


def test_sts_for_web_identity_resolves_as_on_the_full_data(slim: Path) -> None:
    for region in ("us-east-1", "eu-west-1", "cn-north-1"):
        urls = [session(d).client("sts", region_name=region).meta.endpoint_url for d in (None, slim)]
        assert urls[0] == urls[1]


class Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, msg: str, **kw: Any) -> None:
        self.warnings.append((msg, kw))


def test_a_directory_of_another_botocore_or_none_is_not_used(
    slim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    monkeypatch.setattr(slimdata, "get_logger", lambda: log)
    assert slimdata.usable({}) is None
    assert slimdata.usable({slimdata.ENV: str(slim)}) == slim
    assert not log.warnings
    assert slimdata.usable({slimdata.ENV: str(tmp_path / "absent")}) is None
    other = slimdata.write(tmp_path / "other")
    (other / slimdata.STAMP).write_text("0.0.1\n")
    assert slimdata.usable({slimdata.ENV: str(other)}) is None
    assert [kw["found"] for _, kw in log.warnings] == [None, "0.0.1"]
    assert all("using botocore's full data" in msg for msg, _ in log.warnings)


def test_the_store_client_reads_the_directory_the_environment_names(
    slim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(slimdata.ENV, str(slim))
    store_client._slim_data.cache_clear()
    try:
        client = store_client.make_s3_client(S3Config(endpoint="http://127.0.0.1:9", region="us-east-1"))
        assert set(client.meta.service_model.operation_names) == set(slimdata.OPERATIONS)
    finally:
        store_client._slim_data.cache_clear()
    monkeypatch.delenv(slimdata.ENV)
    client = store_client.make_s3_client(S3Config(endpoint="http://127.0.0.1:9", region="us-east-1"))
    assert len(client.meta.service_model.operation_names) > 50


def test_the_command_writes_the_data_and_refuses_no_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert slimdata.main([]) == 2
    assert slimdata.main([str(tmp_path / "d")]) == 0
    assert slimdata.usable({slimdata.ENV: str(tmp_path / "d")}) == tmp_path / "d"
    assert botocore.__version__ in capsys.readouterr().out
