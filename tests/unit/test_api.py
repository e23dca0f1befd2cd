"""The LLMEngine models: wire format, defaults, and errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest

from llmengine.api.v1alpha1 import InvalidEngine, LLMEngine, parse_engine


def manifest(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "LLMEngine",
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {
            "model": {
                "source": {"huggingFace": {"repo": "meta-llama/Llama-3.1-8B-Instruct", "revision": "0e9e39f"}},
                "catalog": "llama-3.1-8b",
            },
            "target": {"gpu": "H100-80GB"},
        },
    }
    body["spec"].update(spec)
    return body


def test_defaults() -> None:
    e = parse_engine(manifest())
    s = e.spec
    assert s.backend == "tensorrt"
    assert s.image is None and s.trtllm_version is None  # the operator's default release applies
    assert (s.precision.dtype, s.precision.quantization, s.precision.kv_cache_dtype) == ("bfloat16", "none", "auto")
    assert (s.parallelism.tensor, s.parallelism.pipeline) == (1, 1)
    assert s.build.max_beam_width == 1 and s.build.kv_cache_type == "paged"
    assert s.build.paged_context_fmha is None and s.build.fp8_context_fmha is None  # left to upstream's rules
    assert s.build.explicit_shapes() == []
    assert s.store is None and s.traffic is None
    assert (s.serving.replicas, s.serving.port, s.serving.max_surge) == (1, 8000, 1)
    assert s.serving.runtime.kv_cache_free_gpu_memory_fraction == 0.9
    assert (s.rebuild_policy.mode, s.rebuild_policy.cooldown, s.rebuild_policy.headroom) == ("Manual", "1h", 1.2)
    assert e.status is None and e.name == "llama" and e.namespace == "ml"


def test_camel_case_round_trip() -> None:
    obj = manifest(
        serving={"runtime": {"kvCacheFreeGpuMemoryFraction": 0.8, "maxBatchSize": 8}, "podAnnotations": {"a": "b"}},
        store={"bucket": "b", "credentialsSecretRef": {"name": "s"}},
    )
    e = parse_engine(obj)
    assert e.spec.serving.runtime.kv_cache_free_gpu_memory_fraction == 0.8
    dumped = e.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
    assert dumped["spec"]["serving"]["runtime"] == {"kvCacheFreeGpuMemoryFraction": 0.8, "maxBatchSize": 8}
    assert dumped["spec"]["store"] == {"bucket": "b", "credentialsSecretRef": {"name": "s"}}
    assert parse_engine(e.model_dump(mode="json", by_alias=True)) == e
    # snake_case works from Python too.
    assert LLMEngine.model_validate({**obj, "api_version": "llmengine.io/v1alpha1"}).api_version == obj["apiVersion"]


def test_status_is_optional_and_tolerant() -> None:
    obj = manifest()
    obj["status"] = {
        "phase": "Ready",
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Serving", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ],
        "servingEngine": {"digest": "abc", "uri": "s3://b/engines/abc/"},
        "build": {"job": "llme-build-x", "attempts": 1, "queuePosition": 0},
        "readyReplicas": 1,
        "somethingNewer": {"x": 1},
    }
    e = parse_engine(obj)
    assert e.status is not None and e.status.phase == "Ready" and e.status.ready_replicas == 1
    assert e.status.conditions is not None and e.status.conditions[0].reason == "Serving"
    assert e.status.serving_engine is not None and e.status.serving_engine.digest == "abc"


def errors_of(obj: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidEngine) as info:
        parse_engine(obj)
    return {e.field: e.message for e in info.value.errors}


def test_every_invalid_field_is_listed() -> None:
    obj = manifest(precision={"dtype": "float8"}, parallelism={"tensor": 0}, serving={"replicas": -1})
    obj["spec"]["target"]["migProfile"] = "huge"
    errs = errors_of(obj)
    assert set(errs) >= {
        "spec.precision.dtype",
        "spec.parallelism.tensor",
        "spec.serving.replicas",
        "spec.target.migProfile",
    }
    with pytest.raises(InvalidEngine) as info:
        parse_engine(obj)
    assert "spec.precision.dtype" in str(info.value)


def test_typo_is_rejected_with_a_suggestion() -> None:
    errs = errors_of(manifest(precission={"dtype": "float16"}))
    assert "did you mean precision?" in errs["spec.precission"]
    errs = errors_of(manifest(serving={"runtime": {"kvCacheFreeGpuMemFraction": 0.5}}))
    assert "kvCacheFreeGpuMemoryFraction" in errs["spec.serving.runtime.kvCacheFreeGpuMemFraction"]


def test_one_of_rules() -> None:
    both = manifest()
    both["spec"]["model"]["source"]["s3"] = {"uri": "s3://b/m/"}
    assert "exactly one of huggingFace or s3" in errors_of(both)["spec.model.source"]
    neither = manifest()
    neither["spec"]["model"]["source"] = {}
    assert "spec.model.source" in errors_of(neither)
    arch = manifest()
    arch["spec"]["model"]["architecture"] = {
        "architecture": "LlamaForCausalLM",
        "numLayers": 1,
        "hiddenSize": 8,
        "numAttentionHeads": 1,
        "vocabSize": 10,
        "parameterCount": 100,
        "maxPositionEmbeddings": 16,
    }
    assert "exactly one of catalog" in errors_of(arch)["spec.model"]
    creds = manifest(
        store={"bucket": "b", "credentialsSecretRef": {"name": "s"}, "workloadIdentity": {"serviceAccountName": "x"}}
    )
    assert "at most one" in errors_of(creds)["spec.store"]


def test_revision_is_required() -> None:
    obj = manifest()
    del obj["spec"]["model"]["source"]["huggingFace"]["revision"]
    assert errors_of(obj) == {"spec.model.source.huggingFace.revision": "required field is missing"}


def test_non_mapping_is_rejected() -> None:
    with pytest.raises(InvalidEngine):
        parse_engine([])  # type: ignore[arg-type]


@pytest.mark.parametrize("cooldown", ["1h", "30m", "1h30m", "90s", "500ms"])
def test_cooldown_durations(cooldown: str) -> None:
    assert parse_engine(manifest(rebuildPolicy={"cooldown": cooldown})).spec.rebuild_policy.cooldown == cooldown


def test_bad_cooldown() -> None:
    assert "spec.rebuildPolicy.cooldown" in errors_of(manifest(rebuildPolicy={"cooldown": "an hour"}))
