"""Download and fetch: the committed engine, and the checkpoint files trtllm-bench reads (not its weights)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from botocore import exceptions as bx

from llmengine.api.artifacts import Manifest, StoreLocation
from llmengine.api.bench import BenchRequest
from llmengine.builder.benchmark.failures import BenchFailure
from llmengine.builder.benchmark.seams import Seams
from llmengine.builder.compiler import TOKENIZER_FILES, copy_tokenizer
from llmengine.builder.fetch import HfDownload, StoreFactory, fetch_hf, split_s3_uri
from llmengine.clients.store import (
    EngineStore,
    IntegrityError,
    ManifestInvalid,
    StoreError,
    load_grant,
    translate_error,
)

# trtllm-bench reads the model's config.json (model type) and initialises its tokenizer from --model_path even
# when the dataset carries token ids; the weights stay in the store.
MODEL_FILES = ("config.json", *TOKENIZER_FILES)


def download_engine(request: BenchRequest, store: EngineStore, dest: Path) -> Manifest:
    """The committed engine, verified file by file; refuses one this request cannot benchmark."""
    digest = request.engine_digest
    grant = None
    try:
        if request.grant_file is not None:
            grant = load_grant(Path(request.grant_file))
            entry = grant.engines.get(digest)
            manifest = entry.manifest if entry is not None else None
        else:
            manifest = store.get_manifest(digest)
    except (ManifestInvalid, IntegrityError) as exc:
        raise BenchFailure("download", "EngineCorrupted", str(exc)) from exc
    except StoreError as exc:
        raise BenchFailure("download", "StoreUnavailable", str(exc)) from exc
    if manifest is None:
        raise BenchFailure(
            "download", "EngineNotCommitted", f"engine {digest} is not committed at {store.uri(digest)}: nothing to run"
        )
    want = (request.backend, request.tp_size, request.pp_size)
    have = (manifest.backend, manifest.tp_size, manifest.pp_size)
    if want != have:
        raise BenchFailure(
            "validate",
            "InvalidRequest",
            f"the request is for backend/tp/pp {want} but engine {digest} is {have}",
            permanent=True,
        )
    if manifest.provenance.test_build and request.compiler != "test":
        raise BenchFailure(
            "validate",
            "TestEngine",
            f"engine {digest} was written by the TEST COMPILER: trtllm-bench cannot load it",
            permanent=True,
        )
    try:
        if grant is not None:
            return store.download_granted(grant, digest, dest)
        return store.download_engine(digest, dest)
    except IntegrityError as exc:
        raise BenchFailure("download", "EngineCorrupted", str(exc)) from exc
    except StoreError as exc:
        raise BenchFailure("download", "StoreUnavailable", str(exc)) from exc


def _only(hf_download: HfDownload | None, patterns: Iterable[str]) -> HfDownload:
    """fetch_hf's download, limited to the named files (allow_patterns) instead of the whole repository."""
    allow = list(patterns)

    def download(**kw: Any) -> Any:
        real = hf_download
        if real is None:
            from huggingface_hub import snapshot_download

            real = snapshot_download
        return real(**kw, allow_patterns=allow)

    return download


def fetch_s3_files(
    uri: str, location: StoreLocation, dest: Path, store_factory: StoreFactory, names: Iterable[str]
) -> int:
    """Download the named top-level files of an S3 prefix (those that exist); returns their bytes."""
    try:
        bucket, prefix = split_s3_uri(uri)
    except ValueError as exc:
        raise BenchFailure("validate", "InvalidRequest", f"model: {exc}", permanent=True) from exc
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    loc = StoreLocation(bucket=bucket, prefix="", endpoint=location.endpoint, region=location.region)
    wanted = set(names)
    total = 0
    try:
        store = store_factory(loc)
        for key, size in sorted(store.list_objects(prefix).items()):
            name = key[len(prefix) :]
            if name in wanted:
                store.client.download_file(bucket, key, str(dest / name))
                total += size
    except StoreError as exc:
        raise BenchFailure("fetch", "FetchFailed", f"model {uri}: {exc}") from exc
    except (bx.BotoCoreError, bx.ClientError) as exc:
        error = translate_error(exc, loc.endpoint or "S3", bucket)
        raise BenchFailure("fetch", "FetchFailed", f"model {uri}: {error}") from exc
    return total


def fetch_model_files(request: BenchRequest, dest: Path, seams: Seams) -> int:
    """config.json and the tokenizer of the checkpoint the engine was built from (the named tokenizer wins)."""
    dest.mkdir(parents=True, exist_ok=True)
    m = request.model
    if (m.hugging_face_repo is None) == (m.s3_uri is None):
        raise BenchFailure("validate", "InvalidRequest", "model: set exactly one of huggingFaceRepo and s3Uri", True)
    if m.s3_uri is not None:
        n = fetch_s3_files(m.s3_uri, request.store, dest, seams.store_factory, MODEL_FILES)
    else:
        assert m.hugging_face_repo is not None
        n = fetch_hf(m.hugging_face_repo, m.revision, dest, _only(seams.hf_download, MODEL_FILES))
    if m.tokenizer:
        tok = dest.parent / "tokenizer"
        tok.mkdir(parents=True, exist_ok=True)
        if m.tokenizer.startswith("s3://"):
            n += fetch_s3_files(m.tokenizer, request.store, tok, seams.store_factory, TOKENIZER_FILES)
        else:
            n += fetch_hf(m.tokenizer, None, tok, _only(seams.hf_download, TOKENIZER_FILES))
        copy_tokenizer(tok, dest)
    if not (dest / "config.json").is_file():
        source = m.s3_uri or m.hugging_face_repo
        raise BenchFailure("fetch", "FetchFailed", f"model {source} has no config.json, which trtllm-bench reads")
    return n
