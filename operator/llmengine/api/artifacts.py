"""Documents exchanged between the operator, the builder and the server.

The build request is what the operator mounts into a build Job; the build result is what the builder writes
into its termination message and next to the engine; the manifest is the commit record of an engine in the
store. All three are versioned JSON documents with camelCase keys. JobResult is the envelope the build result
shares with the benchmark's (bench.py).
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from llmengine.api.engine import EngineConfig
from llmengine.api.v1alpha1 import field_path


class Doc(BaseModel):
    """Base for wire documents: camelCase on the wire, snake_case in Python, unknown keys rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


def first_problem(exc: ValidationError) -> str:
    """A document's first problem on one line: `shapes.maxSeqLen: Field required`, or `Invalid JSON: ...`."""
    first = exc.errors(include_url=False)[0]
    where = field_path(tuple(first["loc"]))
    msg = " ".join(str(first["msg"]).split())
    # An unknown key is whatever the document holds: quote one that would break the line.
    return f"{where if where.isprintable() else repr(where)}: {msg}" if where else msg


class SecretKeyRef(Doc):
    name: str
    key: str


class StoreLocation(Doc):
    """Where engines live: s3://bucket/prefix/<digest>/."""

    bucket: str
    prefix: str = "engines"
    endpoint: str | None = None
    region: str = "us-east-1"

    def engine_prefix(self, digest: str) -> str:
        p = self.prefix.strip("/")
        return f"{p}/{digest}/" if p else f"{digest}/"

    def engine_uri(self, digest: str) -> str:
        return f"s3://{self.bucket}/{self.engine_prefix(digest)}"


class ModelSource(Doc):
    """Exactly one of hugging_face_repo or s3_uri is set."""

    hugging_face_repo: str | None = None
    revision: str | None = None
    s3_uri: str | None = None
    tokenizer: str | None = None


class CalibrationSource(Doc):
    """Where a quantized build's calibration samples are: exactly one of hugging_face_repo (a dataset) or s3_uri.
    How many of them and how long is the EngineConfig's calibration (as upstream applies them)."""

    hugging_face_repo: str | None = None
    revision: str | None = None
    s3_uri: str | None = None


class BuildShapes(Doc):
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_beam_width: int = 1
    opt_num_tokens: int | None = None


class BuildRequest(Doc):
    """Everything a builder needs to produce one engine. The digest identifies it in the store."""

    api_version: Literal["llmengine.io/v1alpha1"] = "llmengine.io/v1alpha1"
    kind: Literal["BuildRequest"] = "BuildRequest"
    engine_digest: str
    backend: Literal["tensorrt", "pytorch"]
    compiler: Literal["tensorrt-llm", "test"] = "tensorrt-llm"
    # Size of the engine the test compiler writes, in bytes; ignored by the real compiler.
    test_engine_bytes: int | None = None
    model: ModelSource
    architecture: str
    # Model facts, as used by the planner (hidden size, layers, ...), passed through for checks and provenance.
    model_facts: dict[str, int | str]
    dtype: Literal["float16", "bfloat16"]
    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    tp_size: int = 1
    pp_size: int = 1
    shapes: BuildShapes
    # Every engine-shaping setting TensorRT-LLM is handed (upstream's names); the builder verifies the engine
    # against it.
    engine: EngineConfig
    # Set exactly when the quantization calibrates; the builder fetches it and nothing reaches the Hub implicitly.
    calibration: CalibrationSource | None = None
    gpu_class: str
    sm: str
    image: str
    trtllm_version: str
    store: StoreLocation

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


class ManifestFile(Doc):
    """One file of an engine: its SHA-256 and size, and, for a file uploaded in parts (bytes [i * partSize,
    (i + 1) * partSize) of it, the last one shorter), what lets a download verify each part in the thread that
    receives it instead of one thread hashing the whole file in order: either `partStates`, the SHA-256 chaining
    value of the file's own hash at the end of every part but the last (written by one in-order hash of the file;
    clients/store/chain.py), or `partSha256`, a separate SHA-256 of each part (a second hash of every byte; written
    where chaining values are not available)."""

    path: str
    sha256: str
    size: int
    part_size: int | None = None
    part_sha256: list[str] | None = None
    part_states: list[str] | None = None


class Provenance(Doc):
    builder_image: str
    trtllm_version: str
    compiler: str
    gpu_class: str
    sm: str
    build_time: str
    build_seconds: float
    test_build: bool = False
    gpu_name: str | None = None
    driver_version: str | None = None


class Manifest(Doc):
    """Written last: its presence is what makes an engine committed."""

    api_version: Literal["llmengine.io/v1alpha1"] = "llmengine.io/v1alpha1"
    kind: Literal["EngineManifest"] = "EngineManifest"
    engine_digest: str
    backend: Literal["tensorrt", "pytorch"]
    tp_size: int
    pp_size: int
    shapes: BuildShapes
    files: list[ManifestFile]
    provenance: Provenance
    # Where under the engine's directory the files lie: builds/<build id>/ (each build uploads to a place of its own,
    # so a racing second build never touches committed files); "" for engines committed before builds had one.
    files_prefix: str = ""
    build_id: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class GrantedEngine(Doc):
    """One committed engine a grant reads: its manifest as the operator read it from the store, and a presigned GET
    URL for each of its files (by manifest path)."""

    manifest: Manifest
    urls: dict[str, str]


class EngineGrant(Doc):
    """Read access to the engines an LLMEngine serves, without store credentials: what the operator keeps in the
    engine's grant Secret for its benchmark and serving pods. The URLs stop working at expires_at."""

    api_version: Literal["llmengine.io/v1alpha1"] = "llmengine.io/v1alpha1"
    kind: Literal["EngineGrant"] = "EngineGrant"
    location: StoreLocation
    expires_at: str
    engines: dict[str, GrantedEngine]


# Kubernetes keeps at most 4 KiB of a termination message.
RESULT_LIMIT = 4096


class JobResult(Doc):
    """What a build or benchmark Job reports when it ends: its container termination message (kept under 4 KiB),
    which the operator reads back. BuildResult and BenchOutcome (bench.py) add what their work produced."""

    api_version: Literal["llmengine.io/v1alpha1"] = "llmengine.io/v1alpha1"
    kind: str
    engine_digest: str
    succeeded: bool
    # Stage that failed and why, in one line.
    stage: str | None = None
    reason: str | None = None
    message: str | None = None
    # A failure the same request can never recover from.
    permanent: bool = False

    @classmethod
    def parse(cls, text: str | bytes) -> Self | None:
        """A termination message as this document, or None when it is not one. Never raises.

        pydantic's JSON parser bounds nesting (json.loads would raise RecursionError on `[[[[...`), so garbage of any
        shape comes back as None.
        """
        try:
            return cls.model_validate_json(text)
        except (ValidationError, ValueError, TypeError):
            return None

    def failure_line(self) -> str:
        """Why it failed, in one line: stage, reason and message, those that are set."""
        parts = [p.strip() for p in (self.stage, self.reason, self.message) if p and p.strip()]
        return ": ".join(parts)

    def fit_json(self, limit: int = RESULT_LIMIT) -> str:
        """The document as JSON under `limit` bytes, shortening the message if it must."""
        text = self.to_json()
        if len(text.encode()) <= limit or not self.message:
            return text
        over = len(text.encode()) - limit
        msg = self.message.encode()[: max(0, len(self.message.encode()) - over - 16)].decode(errors="ignore")
        return self.model_copy(update={"message": msg + "...[cut]"}).to_json()


class BuildProgress(Doc):
    """Where a running build is: written by the builder next to the engine's files as each stage starts, read by the
    operator while the build Job runs (status.build.stage). Never an engine file, never part of the manifest."""

    api_version: Literal["llmengine.io/v1alpha1"] = "llmengine.io/v1alpha1"
    kind: Literal["BuildProgress"] = "BuildProgress"
    engine_digest: str
    stage: str
    since: str  # RFC 3339, UTC


class BuildResult(JobResult):
    """The builder's structured outcome: its termination message, also stored next to the engine. A failed stage is
    one of validate, fetch, compile, verify, upload; permanent for a bad request or an unsupported combination."""

    kind: Literal["BuildResult"] = "BuildResult"
    engine_uri: str | None = None
    total_bytes: int | None = None
    build_seconds: float | None = None
    test_build: bool = False
