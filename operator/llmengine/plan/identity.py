"""Engine identity: a sha256 over exactly the inputs that change the compiled engine.

Two LLMEngines with the same identity can share one engine in the store. The inputs are canonicalized (defaults
filled in, catalog names resolved to facts), so writing a default explicitly or switching from a catalog name to
the same explicit facts keeps the identity. Serving-only settings (replicas, resources, runtime limits, port,
env, scheduling, store, rebuild policy, the token secret) never enter it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from llmengine.api.artifacts import BuildShapes, StoreLocation
from llmengine.api.engine import EngineConfig
from llmengine.api.v1alpha1 import LLMEngineSpec
from llmengine.plan.catalog import ModelFacts
from llmengine.plan.gpus import GpuClass

# Bump when the meaning of an input changes, so old engines are not reused under new semantics.
IDENTITY_SCHEMA = 2
SHORT_PREFIX = "e-"
SHORT_HEX = 12


def canonical_json(inputs: Mapping[str, Any]) -> str:
    return json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def engine_digest(inputs: Mapping[str, Any]) -> str:
    """Full sha256 hex of the canonical JSON of the identity inputs."""
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def short_digest(digest: str) -> str:
    """e-<first 12 hex>: short enough for Kubernetes names (Jobs, Deployments) with room for a prefix."""
    return f"{SHORT_PREFIX}{digest[:SHORT_HEX]}" if digest else ""


def store_key(location: StoreLocation) -> str:
    """A short name for a store location: equal for builds that commit to one place (endpoint, bucket, and the prefix
    as engines are stored under it, so `engines`, `engines/` and `/engines` are one place)."""
    endpoint = (location.endpoint or "").rstrip("/")
    text = f"{endpoint}|{location.bucket}|{location.prefix.strip('/')}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tool_job_name(kind: str, short: str, store: StoreLocation) -> str:
    """A GPU tool Job of an identity's engine in a store, `llme-<kind>-<12 hex of the digest>-<8 hex of the store
    key>` (kind: build, bench). One name per identity and store, so that engines of one identity naming different
    stores in one namespace never share a Job, engines naming the same store always do, and no Job an earlier
    operator named by the identity alone is taken for one of these."""
    return f"llme-{kind}-{short.removeprefix(SHORT_PREFIX)}-{store_key(store)[:8]}"


def model_source_identity(spec: LLMEngineSpec) -> dict[str, Any]:
    source = spec.model.source
    if source.hugging_face is not None:
        hf = source.hugging_face
        return {"huggingFace": {"repo": hf.repo.strip(), "revision": hf.revision.strip()}}
    assert source.s3 is not None
    return {"s3": {"uri": source.s3.uri.strip().rstrip("/")}}


def shapes_dict(shapes: BuildShapes) -> dict[str, int]:
    out = {
        "maxBatchSize": shapes.max_batch_size,
        "maxBeamWidth": shapes.max_beam_width,
        "maxInputLen": shapes.max_input_len,
        "maxNumTokens": shapes.max_num_tokens,
        "maxSeqLen": shapes.max_seq_len,
    }
    if shapes.opt_num_tokens is not None:
        out["optNumTokens"] = shapes.opt_num_tokens
    return out


def identity_inputs(
    spec: LLMEngineSpec,
    *,
    facts: ModelFacts,
    engine: EngineConfig,
    gpu: GpuClass,
    trtllm_version: str,
    builder_image: str,
    compiler: str,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The canonical identity inputs of an engine: the effective EngineConfig (every setting TensorRT-LLM is
    handed, upstream's rules applied, so two specs that build the same engine share a digest), the weights, the
    calibration data, the GPU, the release and the builder image.

    With the pytorch backend the EngineConfig has no build_config: shapes and TensorRT feature flags are runtime
    settings there (a restart, not a rebuild); the prepared checkpoint still depends on everything else.
    """
    inputs: dict[str, Any] = {
        "schema": IDENTITY_SCHEMA,
        "compiler": compiler,
        "backend": spec.backend,
        "builderImage": builder_image.strip(),
        "trtllmVersion": trtllm_version,
        "model": {"source": model_source_identity(spec), "facts": facts.as_dict()},
        "engine": engine.model_dump(mode="json"),
        "gpu": {"class": gpu.name, "sm": gpu.sm},
    }
    if calibration is not None:
        inputs["calibration"] = calibration
    return inputs
