"""Engine identity: one row per input that must move the digest, one row per setting that must not."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import ImageCatalog, ImagePair
from llmengine.plan import engine_digest, make_plan, plan_object, short_digest
from llmengine.plan.catalog import lookup

STORE = StoreLocation(bucket="default-bucket")
# The operator's images: three releases configured, 1.2.1 the default.
IMAGES = ImageCatalog(
    default_version="1.2.1",
    versions={v: ImagePair(builder=f"reg/builder:{v}", server=f"reg/server:{v}") for v in ("1.1.0", "1.2.0", "1.2.1")},
)

Spec = dict[str, Any]


def base() -> dict[str, Any]:
    return {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "LLMEngine",
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {
            "model": {
                "source": {"huggingFace": {"repo": "meta-llama/Llama-3.1-8B-Instruct", "revision": "0e9e39f"}},
                "catalog": "llama-3.1-8b",
            },
            "build": {"maxBatchSize": 64, "maxInputLen": 2048, "maxSeqLen": 4096, "maxNumTokens": 8192},
            "target": {"gpu": "H100-80GB"},
            "store": {"bucket": "engines-a"},
        },
    }


def digest_of(obj: dict[str, Any], compiler: str = "tensorrt-llm", images: ImageCatalog = IMAGES) -> str:
    plan = plan_object(obj, compiler=compiler, default_store=STORE, images=images)
    assert plan.engine_digest, plan.errors
    return plan.engine_digest


def mutate(fn: Callable[[Spec], object]) -> dict[str, Any]:
    obj = base()
    fn(obj["spec"])
    return obj


def _set(path: str, value: Any) -> Callable[[Spec], None]:
    def apply(spec: Spec) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    return apply


def _del(path: str) -> Callable[[Spec], None]:
    def apply(spec: Spec) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for p in parents:
            node = node[p]
        del node[leaf]

    return apply


def _both(*fns: Callable[[Spec], None]) -> Callable[[Spec], None]:
    def apply(spec: Spec) -> None:
        for fn in fns:
            fn(spec)

    return apply


def _explicit_arch(spec: Spec) -> None:
    facts = lookup("llama-3.1-8b")
    assert facts is not None
    del spec["model"]["catalog"]
    spec["model"]["architecture"] = dict(facts.facts.as_dict())


def _traffic(spec: Spec) -> None:
    del spec["build"]
    spec["traffic"] = {"inputTokens": {"mean": 1024, "max": 2048}, "outputTokens": {"mean": 256, "max": 2048}}


MOVES: list[tuple[str, Callable[[Spec], None]]] = [
    ("model revision", _set("model.source.huggingFace.revision", "5206a32")),
    ("model repo", _set("model.source.huggingFace.repo", "someone/Llama-3.1-8B-finetune")),
    (
        "model source s3",
        _set("model.source", {"s3": {"uri": "s3://weights/llama-3.1-8b/"}}),
    ),
    ("model facts (other catalog model)", _set("model.catalog", "mistral-7b")),
    (
        "architecture fact",
        _both(_explicit_arch, _set("model.architecture.parameterCount", 8_000_000_000)),
    ),
    ("backend", _set("backend", "pytorch")),
    ("image", _set("image", "nvcr.io/nvidia/tensorrt-llm/release:1.1.0")),
    ("trtllm version", _set("trtllmVersion", "1.2.0")),
    ("dtype", _set("precision.dtype", "float16")),
    ("quantization", _set("precision.quantization", "fp8")),
    ("kv cache dtype", _set("precision.kvCacheDtype", "fp8")),
    ("tensor parallelism", _set("parallelism.tensor", 2)),
    ("pipeline parallelism", _set("parallelism.pipeline", 2)),
    ("maxBatchSize", _set("build.maxBatchSize", 128)),
    ("maxInputLen", _set("build.maxInputLen", 1024)),
    ("maxSeqLen", _set("build.maxSeqLen", 8192)),
    ("maxNumTokens", _set("build.maxNumTokens", 4096)),
    ("maxBeamWidth", _set("build.maxBeamWidth", 4)),
    ("pagedContextFmha", _set("build.pagedContextFmha", False)),
    ("fp8ContextFmha", _both(_set("precision.quantization", "fp8"), _set("build.fp8ContextFmha", True))),
    ("multipleProfiles", _set("build.multipleProfiles", True)),
    ("kvCacheType", _both(_set("build.kvCacheType", "continuous"), _set("build.pagedContextFmha", False))),
    ("contextFmha", _set("build.contextFmha", False)),
    ("removeInputPadding", _set("build.removeInputPadding", False)),
    ("stripPlan", _set("build.stripPlan", True)),
    ("weightStreaming", _set("build.weightStreaming", True)),
    ("gpu class, same SM", _set("target.gpu", "H200")),
    ("gpu class, other SM", _set("target.gpu", "A100-80GB")),
    ("shapes from traffic", _traffic),
]


@pytest.mark.parametrize(("what", "change"), MOVES, ids=[m[0] for m in MOVES])
def test_changing_moves_the_identity(what: str, change: Callable[[Spec], None]) -> None:
    assert digest_of(mutate(change)) != digest_of(base()), what


def test_compiler_moves_the_identity() -> None:
    assert digest_of(base(), compiler="test") != digest_of(base(), compiler="tensorrt-llm")


def _explicit_defaults(spec: Spec) -> None:
    spec.update(
        backend="tensorrt",
        image="nvcr.io/nvidia/tensorrt-llm/release:1.2.1",
        precision={"dtype": "bfloat16", "quantization": "none", "kvCacheDtype": "auto"},
        parallelism={"tensor": 1, "pipeline": 1},
    )
    spec["build"].update(
        maxBeamWidth=1,
        pagedContextFmha=True,
        fp8ContextFmha=False,
        multipleProfiles=False,
        kvCacheType="paged",
        contextFmha=True,
        removeInputPadding=True,
        stripPlan=False,
        weightStreaming=False,
    )


def _default_shapes_both_ways(spec: Spec) -> None:
    # trtllm-build defaults written out: 2048 / 1024 / max_position_embeddings / 8192.
    spec["build"] = {"maxBatchSize": 2048, "maxInputLen": 1024, "maxSeqLen": 131072, "maxNumTokens": 8192}


KEEPS: list[tuple[str, Callable[[Spec], None]]] = [
    ("replicas", _set("serving.replicas", 3)),
    ("resources", _set("serving.resources", {"requests": {"cpu": 4, "memory": "32Gi"}})),
    ("runtime kv fraction", _set("serving.runtime", {"kvCacheFreeGpuMemoryFraction": 0.8})),
    ("runtime maxBatchSize", _set("serving.runtime", {"maxBatchSize": 32})),
    ("runtime maxNumTokens", _set("serving.runtime", {"maxNumTokens": 4096})),
    ("runtime maxSeqLen", _set("serving.runtime", {"maxSeqLen": 2048})),
    ("port", _set("serving.port", 9000)),
    ("maxSurge", _set("serving.maxSurge", 0)),
    ("env", _set("serving.env", [{"name": "LOG_LEVEL", "value": "debug"}])),
    ("pod annotations", _set("serving.podAnnotations", {"team": "search"})),
    (
        "env from a Secret",
        _set("serving.env", [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]),
    ),
    (
        "pod settings",
        _set(
            "pods",
            {
                "imagePullSecrets": [{"name": "regcred"}],
                "runtimeClassName": "nvidia",
                "priorityClassName": "high",
                "serviceAccountName": "llm",
                "automountServiceAccountToken": True,
                "labels": {"team": "a"},
                "annotations": {"b": "c"},
                "env": [{"name": "HF_ENDPOINT", "value": "https://mirror"}],
                "envFrom": [{"configMapRef": {"name": "cm"}}],
                "volumes": [{"name": "cache", "emptyDir": {}}],
                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                "proxy": {"httpsProxy": "http://proxy:3128", "noProxy": ".svc"},
                "caBundle": {"configMapKeyRef": {"name": "ca", "key": "ca.crt"}},
                "build": {"priorityClassName": "low"},
                "serving": {"runtimeClassName": "nvidia-cdi"},
            },
        ),
    ),
    (
        "pod settings of the build only",
        _set("pods", {"build": {"caBundle": {"secretKeyRef": {"name": "x", "key": "y"}}}}),
    ),
    ("store bucket", _set("store.bucket", "engines-b")),
    ("store prefix and endpoint", _set("store", {"bucket": "engines-a", "prefix": "x", "endpoint": "http://s3"})),
    ("store credentials", _set("store.credentialsSecretRef", {"name": "creds"})),
    ("store workload identity", _set("store.workloadIdentity", {"serviceAccountName": "engines"})),
    ("store absent (operator default)", _del("store")),
    ("tolerations", _set("target.tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists"}])),
    ("nodeSelector", _set("target.nodeSelector", {"pool": "a"})),
    ("affinity", _set("target.affinity", {"nodeAffinity": {}})),
    ("MIG profile (same SM)", _set("target.migProfile", "3g.40gb")),
    ("rebuildPolicy", _set("rebuildPolicy", {"mode": "Auto", "cooldown": "2h", "headroom": 1.5})),
    ("tokenSecretRef", _set("model.source.huggingFace.tokenSecretRef", {"name": "hf", "key": "token"})),
    ("tokenizer", _set("model.tokenizer", "meta-llama/Llama-3.1-8B-Instruct")),
    ("revision whitespace", _set("model.source.huggingFace.revision", " 0e9e39f ")),
    ("catalog name case", _set("model.catalog", "LLaMA-3.1-8B")),
    ("catalog -> same explicit facts", _explicit_arch),
    ("defaults written explicitly", _explicit_defaults),
    ("trtllmVersion equal to the tag", _set("trtllmVersion", "1.2.1")),
    # spec.image only names a release; the images that run are the operator's for that release.
    ("image registry, same version", _set("image", "registry.local/tensorrt-llm/release:1.2.1")),
]


@pytest.mark.parametrize(("what", "change"), KEEPS, ids=[k[0] for k in KEEPS])
def test_setting_keeps_the_identity(what: str, change: Callable[[Spec], None]) -> None:
    assert digest_of(mutate(change)) == digest_of(base()), what


def test_metadata_keeps_the_identity() -> None:
    obj = base()
    obj["metadata"] = {"name": "other", "namespace": "x", "labels": {"a": "b"}, "annotations": {"c": "d"}}
    assert digest_of(obj) == digest_of(base())


def test_unset_shapes_equal_their_defaults_written_out() -> None:
    unset = mutate(_set("build", {}))
    assert digest_of(unset) == digest_of(mutate(_default_shapes_both_ways))


def test_traffic_concurrency_keeps_the_identity() -> None:
    a = mutate(_traffic)
    b = copy.deepcopy(a)
    b["spec"]["traffic"]["concurrency"] = 500
    assert digest_of(a) == digest_of(b)


def test_pytorch_shapes_are_runtime_flags() -> None:
    pt = _set("backend", "pytorch")
    a = mutate(pt)
    b = mutate(_both(pt, _set("build.maxBatchSize", 256)))
    assert digest_of(a) == digest_of(b)
    assert plan_object(b, default_store=STORE).runtime_args[:2] == ["--max_batch_size", "256"]


def test_digest_is_stable_and_short_form_is_a_name() -> None:
    d = digest_of(base())
    assert re.fullmatch(r"[0-9a-f]{64}", d)
    assert digest_of(base()) == d
    plan = plan_object(base(), images=IMAGES)
    assert plan.short_digest == f"e-{d[:12]}" == short_digest(d)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", plan.short_digest)


def test_digest_is_sha256_of_canonical_inputs() -> None:
    plan = plan_object(base(), images=IMAGES)
    assert engine_digest(plan.engine_inputs) == plan.engine_digest
    # Key order does not matter: the canonical form sorts keys.
    reordered = dict(reversed(list(plan.engine_inputs.items())))
    assert engine_digest(reordered) == plan.engine_digest
    assert set(plan.engine_inputs) == {
        "schema",
        "compiler",
        "backend",
        "builderImage",
        "trtllmVersion",
        "model",
        "engine",
        "gpu",
    }


def test_the_builder_image_of_the_release_moves_the_identity_and_the_server_image_only_rolls_out() -> None:
    from llmengine.api.v1alpha1 import parse_engine
    from llmengine.plan import compare

    rebuilt = IMAGES.model_copy(
        update={
            "versions": {
                **IMAGES.versions,
                "1.2.1": ImagePair(builder="reg/builder:1.2.1-p1", server="reg/server:1.2.1"),
            }
        }
    )
    reserved = IMAGES.model_copy(
        update={
            "versions": {
                **IMAGES.versions,
                "1.2.1": ImagePair(builder="reg/builder:1.2.1", server="reg/server:1.2.1-p1"),
            }
        }
    )
    assert digest_of(base(), images=rebuilt) != digest_of(base())
    old = plan_object(base(), default_store=STORE, images=IMAGES)
    new = plan_object(base(), default_store=STORE, images=reserved)
    assert new.engine_digest == old.engine_digest
    assert (new.builder_image, new.server_image) == ("reg/builder:1.2.1", "reg/server:1.2.1-p1")
    assert new.build_request is not None and new.build_request.image == "reg/builder:1.2.1"
    engine = parse_engine(base())
    assert compare(old, new, engine, engine) == "rollout"


def test_a_release_without_images_is_refused_with_the_configured_ones() -> None:
    plan = plan_object(mutate(_set("trtllmVersion", "1.2.2")), default_store=STORE, images=IMAGES)
    assert not plan.valid
    (err,) = plan.errors
    assert err.field == "spec.trtllmVersion"
    assert "1.2.2 has no builder and server images" in err.message and "1.1.0, 1.2.0, 1.2.1" in err.message
    by_image = plan_object(mutate(_set("image", "nvcr.io/nvidia/tensorrt-llm/release:1.2.0rc1")), images=IMAGES)
    assert [e.field for e in by_image.errors] == ["spec.image"]


def test_make_plan_and_plan_object_agree() -> None:
    from llmengine.api.v1alpha1 import parse_engine

    assert make_plan(parse_engine(base())).engine_digest == plan_object(base()).engine_digest


def _fp8_with(calibration: dict[str, Any]) -> dict[str, Any]:
    return mutate(_set("precision", {"quantization": "fp8", "calibration": calibration}))


def test_calibration_data_is_part_of_a_calibrating_engine_identity() -> None:
    hf = {"dataset": {"huggingFace": {"repo": "org/text", "revision": "abc"}}}
    base_digest = digest_of(_fp8_with(hf))
    assert digest_of(_fp8_with({"dataset": {"huggingFace": {"repo": "org/text", "revision": "def"}}})) != base_digest
    assert digest_of(_fp8_with({**hf, "samples": 256})) != base_digest
    assert digest_of(_fp8_with({**hf, "maxSeqLength": 1024})) != base_digest
    assert digest_of(_fp8_with({"dataset": {"s3": {"uri": "s3://b/cal/"}}})) != base_digest
    # Defaults written out and a trailing slash keep it.
    assert digest_of(_fp8_with({**hf, "samples": 512, "maxSeqLength": 512})) == base_digest
    assert digest_of(_fp8_with({"dataset": {"s3": {"uri": "s3://b/cal"}}})) == digest_of(
        _fp8_with({"dataset": {"s3": {"uri": "s3://b/cal/"}}})
    )


def _cal(spec: Spec) -> None:
    spec["precision"]["calibration"] = {"dataset": {"s3": {"uri": "s3://b/cal/"}}}


@pytest.mark.parametrize(
    ("what", "left", "right"),
    [
        # Upstream's choice written out equals upstream's choice left unset (rules F4, F6, T3, T2b).
        (
            "fp8ContextFmha forced on by an fp8 KV cache",
            _both(_set("precision", {"quantization": "fp8", "kvCacheDtype": "fp8"}), _cal),
            _both(
                _set("precision", {"quantization": "fp8", "kvCacheDtype": "fp8"}),
                _cal,
                _set("build.fp8ContextFmha", True),
            ),
        ),
        (
            "pagedContextFmha dropped by an int8 KV cache",
            _both(_set("precision", {"quantization": "int4_awq", "kvCacheDtype": "int8"}), _cal),
            _both(
                _set("precision", {"quantization": "int4_awq", "kvCacheDtype": "int8"}),
                _cal,
                _set("build.pagedContextFmha", False),
            ),
        ),
        (
            "maxNumTokens clipped to maxBatchSize x maxSeqLen",
            _set("build", {"maxBatchSize": 1, "maxInputLen": 1024, "maxSeqLen": 2048}),
            _set("build", {"maxBatchSize": 1, "maxInputLen": 1024, "maxSeqLen": 2048, "maxNumTokens": 2048}),
        ),
        (
            "AWQ calibrates on at most 32 samples",
            _both(_set("precision", {"quantization": "int4_awq"}), _cal, _set("precision.calibration.samples", 32)),
            _both(_set("precision", {"quantization": "int4_awq"}), _cal, _set("precision.calibration.samples", 512)),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_specs_that_build_the_same_engine_share_a_digest(
    what: str, left: Callable[[Spec], None], right: Callable[[Spec], None]
) -> None:
    assert digest_of(mutate(left)) == digest_of(mutate(right)), what


def test_the_identity_is_the_effective_engine_config() -> None:
    plan = plan_object(base(), default_store=STORE, images=IMAGES)
    assert plan.engine is not None and plan.engine_inputs["engine"] == plan.engine.model_dump(mode="json")
