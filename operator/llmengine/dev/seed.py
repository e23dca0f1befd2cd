"""Objects the demo, the tests and the benchmarks put into a dev cluster: a tiny checkpoint in S3, the store Secret
and LLMEngines for them."""

from __future__ import annotations

import json
import os
from typing import Any

from llmengine.api.artifacts import BuildShapes, Provenance
from llmengine.dev.cluster import ClusterInfo

# The model facts engine() declares for the tiny checkpoint (a two-layer Llama, as upload_tiny_checkpoint writes it).
TINY_ARCH = {
    "architecture": "LlamaForCausalLM",
    "numLayers": 2,
    "hiddenSize": 256,
    "numAttentionHeads": 4,
    "numKeyValueHeads": 4,
    "headDim": 64,
    "vocabSize": 32000,
    "parameterCount": 20_000_000,
    "maxPositionEmbeddings": 4096,
}


def engine(name: str, info: ClusterInfo, model_uri: str, store_prefix: str, **overrides: Any) -> dict[str, Any]:
    """An LLMEngine for the tiny checkpoint at `model_uri`, stored in the dev S3 under `store_prefix`; `overrides`
    merge into its spec (a dict into the section of that name, anything else replacing it)."""
    spec: dict[str, Any] = {
        "model": {"source": {"s3": {"uri": model_uri}}, "architecture": dict(TINY_ARCH)},
        "precision": {"dtype": "bfloat16"},
        "build": {"maxBatchSize": 8, "maxInputLen": 512, "maxSeqLen": 1024, "maxNumTokens": 2048},
        "target": {"gpu": "H100-80GB"},
        "store": {
            "bucket": info.s3_bucket,
            "prefix": store_prefix,
            "endpoint": info.s3_endpoint,
            "credentialsSecretRef": {"name": "s3-creds"},
        },
        "serving": {"replicas": 2},
    }
    for k, v in overrides.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    return {"apiVersion": "llmengine.io/v1alpha1", "kind": "LLMEngine", "metadata": {"name": name}, "spec": spec}


def upload_tiny_checkpoint(info: ClusterInfo, prefix: str, num_layers: int = 2, weight_bytes: int = 64 * 1024) -> str:
    """A small HF-format checkpoint (config, tokenizer, weights) that the builder fetches through its S3 source
    (no Hugging Face download can run locally). Returns its s3:// URI."""
    s3 = info.s3().client()
    files = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": num_layers}).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": b"{}",
        "model.safetensors": os.urandom(weight_bytes),
    }
    for name, data in files.items():
        s3.put_object(Bucket=info.s3_bucket, Key=f"{prefix}/{name}", Body=data)
    return f"s3://{info.s3_bucket}/{prefix}/"


def calibration_jsonl(samples: int = 16) -> bytes:
    """A small calibration split in the layout TensorRT-LLM reads from a local dataset directory: train.jsonl with
    one {"text": ...} record per line."""
    lines = [
        json.dumps({"text": f"Calibration sample {i}: the quick brown fox jumps over the lazy dog {i} times."})
        for i in range(samples)
    ]
    return ("\n".join(lines) + "\n").encode()


def upload_calibration_dataset(info: ClusterInfo, prefix: str, samples: int = 16) -> str:
    """Calibration samples for quantized builds, in the dev S3 (no Hub download runs locally); its s3:// URI."""
    s3 = info.s3().client()
    s3.put_object(Bucket=info.s3_bucket, Key=f"{prefix}/train.jsonl", Body=calibration_jsonl(samples))
    return f"s3://{info.s3_bucket}/{prefix}/"


def calibration_spec(uri: str, samples: int = 16) -> dict[str, Any]:
    """spec.precision.calibration for a dataset uploaded by upload_calibration_dataset."""
    return {"dataset": {"s3": {"uri": uri}}, "samples": samples, "maxSeqLength": 64}


def create_store_secret(api: Any, info: ClusterInfo, ns: str, name: str = "s3-creds") -> str:
    """The Secret engines and pods reference for the dev S3 credentials; an existing one is kept."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    body = {
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": info.s3_access_key, "AWS_SECRET_ACCESS_KEY": info.s3_secret_key},
    }
    try:
        client.CoreV1Api(api).create_namespaced_secret(ns, body)
    except ApiException as e:
        if e.status != 409:
            raise
    return name


def apply_crd(api: Any, body: dict[str, Any] | None = None, timeout: float = 30.0) -> str:
    """Create a CustomResourceDefinition (the generated LLMEngine one by default; one that exists is kept) and wait
    until it is Established. Returns its name."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from llmengine.api.crdgen import crd
    from llmengine.dev.cluster import wait_for

    body = body or crd()
    name = str(body["metadata"]["name"])
    ext = client.ApiextensionsV1Api(api)
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as e:
        if e.status != 409:
            raise

    def established() -> bool:
        c = ext.read_custom_resource_definition(name)
        return any(x.type == "Established" and x.status == "True" for x in c.status.conditions or [])

    wait_for(f"{name} Established", established, timeout=timeout)
    return name


def engine_manifest(
    name: str = "tiny",
    *,
    quantization: str = "none",
    kv_cache_dtype: str = "auto",
    tp: int = 1,
    pp: int = 1,
    gpu: str = "H100-80GB",
    backend: str = "tensorrt",
    build: dict[str, Any] | None = None,
    calibration_uri: str = "s3://engines/calibration/",
    model_uri: str = "s3://models/tiny/",
    catalog: str = "llama-3.1-8b",
) -> dict[str, Any]:
    """An LLMEngine object for tests: small shapes, calibration data named when the quantization calibrates."""
    precision: dict[str, Any] = {"dtype": "float16", "quantization": quantization, "kvCacheDtype": kv_cache_dtype}
    if quantization not in ("none", "int8_weight_only") or kv_cache_dtype != "auto":
        precision["calibration"] = {"dataset": {"s3": {"uri": calibration_uri}}, "samples": 16, "maxSeqLength": 64}
    shapes = {"maxBatchSize": 8, "maxInputLen": 128, "maxSeqLen": 256, "maxNumTokens": 512}
    return {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "LLMEngine",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"source": {"s3": {"uri": model_uri}}, "catalog": catalog},
            "backend": backend,
            "precision": precision,
            "parallelism": {"tensor": tp, "pipeline": pp},
            "build": {**shapes, **(build or {})},
            "target": {"gpu": gpu},
            "store": {"bucket": "engines"},
        },
    }


def build_request(compiler: str = "test", **kw: Any) -> Any:
    """The BuildRequest the planner writes for engine_manifest(**kw): what a build Job receives."""
    from llmengine.plan import plan_object

    plan = plan_object(engine_manifest(**kw), compiler=compiler, test_engine_bytes=3 * 1024 + 1)
    if plan.build_request is None:
        raise ValueError(f"engine_manifest({kw}) does not plan: {plan.errors}")
    return plan.build_request


# A stored engine's metadata for benchmarks of the store itself (no model, no build: bytes only).
BENCH_SHAPES = BuildShapes(max_batch_size=1, max_input_len=1, max_seq_len=1, max_num_tokens=1)


def bench_provenance() -> Provenance:
    return Provenance(
        builder_image="bench",
        trtllm_version="1.2.1",
        compiler="test",
        gpu_class="none",
        sm="0.0",
        build_time="now",
        build_seconds=0,
        test_build=True,
    )
