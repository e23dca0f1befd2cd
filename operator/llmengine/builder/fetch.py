"""Fetch the model checkpoint a build starts from: a Hugging Face repo, or every object under an S3 prefix."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmengine.api.artifacts import BuildRequest, StoreLocation
from llmengine.builder.compiler import BuildFailure, copy_tokenizer
from llmengine.clients.store import EngineStore, StoreError, store_for

# Weights in formats no converter reads; Llama repos ship a second full copy under original/.
HF_IGNORE_PATTERNS = ["original/*", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]

HfDownload = Callable[..., Any]
StoreFactory = Callable[[StoreLocation], EngineStore]


@dataclass(frozen=True)
class FetchResult:
    path: Path
    bytes: int
    seconds: float


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket")
    return bucket, prefix


def default_store_factory(location: StoreLocation) -> EngineStore:
    return store_for(location)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def fetch_s3(uri: str, store_location: StoreLocation, dest: Path, store_factory: StoreFactory) -> int:
    """Download an S3 prefix with the store's endpoint and region (same credentials from the environment)."""
    bucket, prefix = split_s3_uri(uri)
    loc = StoreLocation(bucket=bucket, prefix="", endpoint=store_location.endpoint, region=store_location.region)
    store = store_factory(loc)
    try:
        return store.download_prefix(prefix, dest)
    except StoreError as exc:
        raise BuildFailure("fetch", "FetchFailed", f"model {uri}: {exc}") from exc


def fetch_hf(
    repo_id: str,
    revision: str | None,
    dest: Path,
    hf_download: HfDownload | None = None,
    token: str | None = None,
    repo_type: str = "model",
) -> int:
    """snapshot_download into dest. The token comes from HF_TOKEN and is passed, never logged."""
    if hf_download is None:
        from huggingface_hub import snapshot_download

        hf_download = snapshot_download
    token = token if token is not None else (os.environ.get("HF_TOKEN") or None)
    kwargs: dict[str, Any] = {"repo_type": repo_type} if repo_type != "model" else {}
    try:
        hf_download(
            repo_id=repo_id,
            revision=revision,
            token=token,
            local_dir=str(dest),
            ignore_patterns=HF_IGNORE_PATTERNS,
            **kwargs,
        )
    except Exception as exc:
        raise _hf_failure(repo_id, revision, exc, repo_type) from exc
    return _tree_bytes(dest)


def _hf_failure(repo_id: str, revision: str | None, exc: Exception, repo_type: str = "model") -> BuildFailure:
    name = type(exc).__name__
    field = (
        "spec.model.source.huggingFace" if repo_type == "model" else "spec.precision.calibration.dataset.huggingFace"
    )
    if name == "GatedRepoError":
        return BuildFailure(
            "fetch", "FetchFailed", f"{repo_id} is gated: put a token with access into the HF_TOKEN secret"
        )
    if name == "RepositoryNotFoundError":
        return BuildFailure(
            "fetch",
            "ModelNotFound",
            f"Hugging Face {repo_type} repo {repo_id} does not exist or is private (set HF_TOKEN): fix {field}.repo",
            permanent=True,
        )
    if name == "RevisionNotFoundError":
        return BuildFailure(
            "fetch",
            "ModelNotFound",
            f"revision {revision} of {repo_id} does not exist: fix {field}.revision",
            permanent=True,
        )
    msg = " ".join(str(exc).split())[:300]
    return BuildFailure("fetch", "FetchFailed", f"downloading {repo_id}: {name}: {msg}")


def fetch_model(
    request: BuildRequest,
    dest: Path,
    store_factory: StoreFactory = default_store_factory,
    hf_download: HfDownload | None = None,
) -> FetchResult:
    dest.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    m = request.model
    if m.s3_uri is not None:
        n = fetch_s3(m.s3_uri, request.store, dest, store_factory)
    elif m.hugging_face_repo is not None:
        n = fetch_hf(m.hugging_face_repo, m.revision, dest, hf_download)
    else:  # check_request refuses this earlier
        raise BuildFailure("fetch", "InvalidRequest", "no model source", permanent=True)
    if m.tokenizer:
        tok = dest.parent / "tokenizer"
        tok.mkdir(parents=True, exist_ok=True)
        if m.tokenizer.startswith("s3://"):
            fetch_s3(m.tokenizer, request.store, tok, store_factory)
        else:
            fetch_hf(m.tokenizer, None, tok, hf_download)
        # The compilers take the tokenizer from the checkpoint directory; the named one wins.
        copy_tokenizer(tok, dest)
    return FetchResult(path=dest, bytes=n, seconds=time.monotonic() - start)


# Files the datasets library loads from a local dataset directory (upstream's calibration reads the train split's
# "text" column from such a directory).
CALIBRATION_FORMATS = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")


def check_calibration_dir(root: Path) -> None:
    """The fetched calibration dataset has data files; JSON Lines ones carry a "text" key (what upstream reads)."""
    data = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in CALIBRATION_FORMATS and ".cache" not in p.parts
    )
    if not data:
        raise BuildFailure(
            "fetch",
            "CalibrationInvalid",
            f"the calibration dataset has no data files ({', '.join(CALIBRATION_FORMATS)}): fix "
            "precision.calibration.dataset",
            permanent=True,
        )
    for p in data:
        if p.suffix != ".jsonl":
            continue
        with p.open(encoding="utf-8", errors="replace") as f:
            first = f.readline()
        try:
            record = json.loads(first)
        except json.JSONDecodeError as exc:
            raise BuildFailure(
                "fetch", "CalibrationInvalid", f"calibration file {p.name}: line 1 is not JSON ({exc.msg})", True
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BuildFailure(
                "fetch",
                "CalibrationInvalid",
                f'calibration file {p.name}: records need a "text" string (the column TensorRT-LLM calibrates on)',
                permanent=True,
            )


def fetch_calibration(
    request: BuildRequest,
    dest: Path,
    store_factory: StoreFactory = default_store_factory,
    hf_download: HfDownload | None = None,
) -> FetchResult | None:
    """The calibration dataset into dest, checked; None when the request's quantization does not calibrate."""
    c = request.calibration
    if c is None:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if c.s3_uri is not None:
        n = fetch_s3(c.s3_uri, request.store, dest, store_factory)
    elif c.hugging_face_repo is not None:
        n = fetch_hf(c.hugging_face_repo, c.revision, dest, hf_download, repo_type="dataset")
    else:
        raise BuildFailure("fetch", "InvalidRequest", "calibration has no dataset source", permanent=True)
    check_calibration_dir(dest)
    return FetchResult(path=dest, bytes=n, seconds=time.monotonic() - start)
