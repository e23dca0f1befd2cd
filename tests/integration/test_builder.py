"""build-engine end to end against a real S3 server, as the Job runs it: a subprocess reading a BuildRequest.

The model is a tiny Hugging Face-format checkpoint the test uploads to S3; the compiler is the test compiler
(NOT TensorRT-LLM). The engine is then downloaded and verified by serve-engine, as an init container would.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llmengine.api.artifacts import BuildRequest, BuildResult, StoreLocation
from llmengine.clients.store import EngineStore, S3Config, file_sha256, make_s3_client
from llmengine.dev import seed
from llmengine.dev.s3 import S3Endpoint

MiB = 1024 * 1024


def tiny_checkpoint() -> dict[str, bytes]:
    """config.json, tokenizer files and a real safetensors file (header + one float16 tensor)."""
    tensor = struct.pack("<8e", *[0.5] * 8)
    header = json.dumps(
        {"model.embed_tokens.weight": {"dtype": "F16", "shape": [2, 4], "data_offsets": [0, len(tensor)]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "vocab_size": 2,
        "torch_dtype": "float16",
    }
    return {
        "config.json": json.dumps(config).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}).encode(),
        "tokenizer_config.json": b'{"model_max_length": 256}',
        "special_tokens_map.json": b"{}",
        "model.safetensors": struct.pack("<Q", len(header)) + header + tensor,
    }


def upload_checkpoint(client: Any, bucket: str, prefix: str) -> None:
    for name, body in tiny_checkpoint().items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)


def make_request(ep: S3Endpoint, bucket: str, digest: str, **kw: Any) -> BuildRequest:
    """The planner's request (seed.build_request; tp 2 unless tp_size says), for this S3 server and bucket."""
    plan_kw = {"tp": kw.pop("tp_size", 2)}
    for key in ("quantization", "kv_cache_dtype", "gpu"):
        if key in kw:
            plan_kw[key] = kw.pop(key)
    data = seed.build_request(model_uri=f"s3://{bucket}/models/tiny/", **plan_kw).model_dump()
    data.update(
        engine_digest=digest,
        test_engine_bytes=5 * MiB + 3,
        store={"bucket": bucket, "prefix": "engines", "endpoint": ep.endpoint},
    )
    data.update(kw)
    return BuildRequest.model_validate(data)


def env_for(ep: S3Endpoint, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(ep.env())
    env.update(extra)
    return env


def llmengine(*args: str, env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmengine.cli", *args], env=env, capture_output=True, text=True, timeout=300, **kw
    )


def store_of(ep: S3Endpoint, bucket: str) -> EngineStore:
    client = make_s3_client(
        S3Config(endpoint=ep.endpoint, access_key_id=ep.access_key, secret_access_key=ep.secret_key)
    )
    return EngineStore(client, StoreLocation(bucket=bucket, endpoint=ep.endpoint))


def test_build_from_an_s3_checkpoint_commits_and_the_server_verifies_it(
    s3_endpoint: S3Endpoint, s3_bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    upload_checkpoint(s3_client, s3_bucket, "models/tiny")
    req = make_request(s3_endpoint, s3_bucket, "a1b2c3d4e5f60718")
    (tmp_path / "request.json").write_text(req.to_json())
    env = env_for(s3_endpoint, LLMENGINE_BUILDER_IMAGE="registry.example/llmengine-builder@sha256:abc")
    work = tmp_path / "work"
    p = llmengine(
        "build-engine",
        "--request",
        str(tmp_path / "request.json"),
        "--work-dir",
        str(work),
        "--result",
        str(tmp_path / "termination-log"),
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = BuildResult.model_validate_json((tmp_path / "termination-log").read_text())
    assert result.succeeded and result.test_build and result.engine_uri == req.store.engine_uri(req.engine_digest)
    assert len((tmp_path / "termination-log").read_bytes()) < 4096
    assert json.loads(p.stdout.strip().splitlines()[-1]) == json.loads(result.to_json())
    stages = [json.loads(line) for line in p.stderr.splitlines() if '"stage finished"' in line]
    assert [s["stage"] for s in stages] == ["fetch", "compile", "verify", "upload"]
    assert all("seconds" in s for s in stages) and stages[-1]["bytes"] == result.total_bytes
    assert "NOT TensorRT-LLM" in p.stderr

    store = store_of(s3_endpoint, s3_bucket)
    manifest = store.get_manifest(req.engine_digest)
    assert manifest is not None and manifest.provenance.test_build
    assert manifest.provenance.builder_image == "registry.example/llmengine-builder@sha256:abc"
    assert (manifest.tp_size, manifest.pp_size, manifest.shapes) == (2, 1, req.shapes)
    engine = work / "engine"
    names = {f.path for f in manifest.files}
    assert {"config.json", "rank0.engine", "rank1.engine", "tokenizer.json", "tokenizer_config.json"} <= names
    for f in manifest.files:
        assert f.sha256 == file_sha256(engine / f.path) and f.size == (engine / f.path).stat().st_size
    assert store.get_result(req.engine_digest, manifest.files_prefix) == result
    # Where the build was, for status.build.stage: its last stage, next to the files and never one of them.
    progress = store.get_progress(req.engine_digest)
    assert progress is not None and progress.stage == "upload" and progress.engine_digest == req.engine_digest
    assert "build-progress.json" not in names

    dl = llmengine(
        "serve-engine",
        "download",
        "--digest",
        req.engine_digest,
        "--bucket",
        s3_bucket,
        "--endpoint",
        s3_endpoint.endpoint,
        "--engine-dir",
        str(tmp_path / "served"),
        env=env,
    )
    assert dl.returncode == 0, dl.stderr[-3000:]
    for f in manifest.files:
        assert file_sha256(tmp_path / "served" / f.path) == f.sha256
    assert json.loads((tmp_path / "served" / "manifest.json").read_text())["engineDigest"] == req.engine_digest

    # A retried or duplicated Job finds the commit and leaves it alone.
    t = time.monotonic()
    again = llmengine(
        "build-engine", "--request", str(tmp_path / "request.json"), "--result", str(tmp_path / "r2"), env=env
    )
    assert again.returncode == 0 and "already committed" in (tmp_path / "r2").read_text()
    assert time.monotonic() - t < 30
    assert store.get_manifest(req.engine_digest) == manifest


def test_an_upload_killed_midway_leaves_nothing_committed(
    s3_endpoint: S3Endpoint, s3_bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    upload_checkpoint(s3_client, s3_bucket, "models/tiny")
    req = make_request(s3_endpoint, s3_bucket, "killed0123456789", tp_size=1, test_engine_bytes=400 * MiB)
    (tmp_path / "request.json").write_text(req.to_json())
    env = env_for(s3_endpoint, LLMENGINE_S3_PART_SIZE_MIB="8", LLMENGINE_S3_CONCURRENCY="2")
    builder = subprocess.Popen(
        [sys.executable, "-m", "llmengine.cli", "build-engine", "--request", str(tmp_path / "request.json")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        parts = 0
        while time.monotonic() < deadline and parts < 3:
            assert builder.poll() is None, "the builder finished before it could be interrupted"
            for up in s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []):
                listed = s3_client.list_parts(Bucket=s3_bucket, Key=up["Key"], UploadId=up["UploadId"])
                parts = max(parts, len(listed.get("Parts", [])))
            time.sleep(0.05)
        assert parts >= 3, "never saw the multipart upload in progress"
    finally:
        os.killpg(builder.pid, signal.SIGKILL)
        builder.wait()

    store = store_of(s3_endpoint, s3_bucket)
    assert not store.is_committed(req.engine_digest)
    dl = llmengine(
        "serve-engine",
        "download",
        "--digest",
        req.engine_digest,
        "--bucket",
        s3_bucket,
        "--endpoint",
        s3_endpoint.endpoint,
        "--engine-dir",
        str(tmp_path / "served"),
        env=env_for(s3_endpoint),
    )
    errors = [ln for ln in dl.stderr.splitlines() if ln.startswith("serve-engine:")]
    assert dl.returncode == 1 and len(errors) == 1
    assert f"engine {req.engine_digest} is not committed: no manifest.json" in errors[0]
    assert not (tmp_path / "served" / "rank0.engine").exists()


def test_an_unsupported_request_fails_permanently_without_touching_the_store(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    # FP8 on an A100 (as a request edited past the planner would ask): TensorRT has no FP8 kernels on SM 8.0.
    req = make_request(s3_endpoint, s3_bucket, "perm000000000001", quantization="fp8")
    req = req.model_copy(update={"sm": "8.0", "gpu_class": "A100-80GB"})
    (tmp_path / "request.json").write_text(req.to_json())
    p = llmengine(
        "build-engine",
        "--request",
        str(tmp_path / "request.json"),
        "--result",
        str(tmp_path / "r"),
        env=env_for(s3_endpoint),
    )
    result = BuildResult.model_validate_json((tmp_path / "r").read_text())
    assert p.returncode == 1 and not result.succeeded and result.permanent
    assert result.stage == "validate" and result.reason == "UnsupportedCombination"
    assert store_of(s3_endpoint, s3_bucket).list_objects("engines/") == {}


@pytest.mark.parametrize("secret", ["wrong-secret-value"])
def test_wrong_store_credentials_fail_with_the_one_line_reason(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path, secret: str
) -> None:
    req = make_request(s3_endpoint, s3_bucket, "creds00000000001")
    (tmp_path / "request.json").write_text(req.to_json())
    env = env_for(s3_endpoint, AWS_SECRET_ACCESS_KEY=secret)
    p = llmengine("build-engine", "--request", str(tmp_path / "request.json"), "--result", str(tmp_path / "r"), env=env)
    result = BuildResult.model_validate_json((tmp_path / "r").read_text())
    assert p.returncode == 1 and not result.permanent and result.reason == "StoreUnavailable"
    assert result.message == (
        "S3 rejected the credentials (SignatureDoesNotMatch): check the secret named in spec.store.credentialsSecretRef"
    )
    assert secret not in p.stderr and secret not in p.stdout


def test_a_broken_manifest_is_rebuilt_over(
    s3_endpoint: S3Endpoint, s3_bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    upload_checkpoint(s3_client, s3_bucket, "models/tiny")
    req = make_request(s3_endpoint, s3_bucket, "broken0000000001", tp_size=1)
    s3_client.put_object(Bucket=s3_bucket, Key=f"engines/{req.engine_digest}/manifest.json", Body=b'{"kind": 1}')
    (tmp_path / "request.json").write_text(req.to_json())
    p = llmengine(
        "build-engine",
        "--request",
        str(tmp_path / "request.json"),
        "--result",
        str(tmp_path / "r"),
        env=env_for(s3_endpoint),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "existing manifest is broken; rebuilding over it" in p.stderr
    manifest = store_of(s3_endpoint, s3_bucket).get_manifest(req.engine_digest)
    assert manifest is not None and {f.path for f in manifest.files} >= {"config.json", "rank0.engine"}


def test_a_calibrating_build_fetches_its_samples_from_s3_and_hands_them_to_the_compiler(
    s3_endpoint: S3Endpoint, s3_bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    from llmengine.dev.seed import calibration_jsonl

    upload_checkpoint(s3_client, s3_bucket, "models/tiny")
    s3_client.put_object(Bucket=s3_bucket, Key="calibration/text/train.jsonl", Body=calibration_jsonl(12))
    cal = {"s3_uri": f"s3://{s3_bucket}/calibration/text/"}
    req = make_request(s3_endpoint, s3_bucket, "ca11b4a7e0000001", quantization="fp8", calibration=cal)
    (tmp_path / "request.json").write_text(req.to_json())
    work = tmp_path / "work"
    p = llmengine(
        "build-engine", "--request", str(tmp_path / "request.json"), "--work-dir", str(work),
        "--result", str(tmp_path / "result"), env=env_for(s3_endpoint),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    stages = [json.loads(line)["stage"] for line in p.stderr.splitlines() if '"stage finished"' in line]
    assert stages == ["fetch", "fetch-calibration", "compile", "verify", "upload"]
    marker = json.loads((work / "engine" / "llmengine-test-build.json").read_text())
    assert marker["calibration_samples"] == 12  # all 12 texts: the engine asks for up to 16

    # A dataset without the text column is refused at fetch, permanently, before any compile.
    s3_client.put_object(Bucket=s3_bucket, Key="calibration/bad/train.jsonl", Body=b'{"article": "x"}\n')
    bad = req.model_copy(
        update={
            "engine_digest": "ca11b4a7e0000002",
            "calibration": req.calibration.model_copy(update={"s3_uri": f"s3://{s3_bucket}/calibration/bad/"}),  # type: ignore[union-attr]
        }
    )
    (tmp_path / "bad.json").write_text(bad.to_json())
    p = llmengine(
        "build-engine", "--request", str(tmp_path / "bad.json"), "--work-dir", str(tmp_path / "w2"),
        "--result", str(tmp_path / "bad-result"), env=env_for(s3_endpoint),
    )  # fmt: skip
    result = BuildResult.model_validate_json((tmp_path / "bad-result").read_text())
    assert p.returncode == 1 and not result.succeeded and result.permanent
    assert (result.stage, result.reason) == ("fetch", "CalibrationInvalid") and '"text"' in (result.message or "")
