"""The planner: arithmetic checked by hand, every validation rule, the plan's fields, and compare()."""

from __future__ import annotations

import copy
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest

from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import ImageCatalog, ImagePair
from llmengine.api.v1alpha1 import LLMEngine, parse_engine
from llmengine.plan import Plan, compare, make_plan, plan_object
from llmengine.plan.catalog import CATALOG, lookup
from llmengine.plan.gpus import GIB, GPU_CLASSES, MIB
from llmengine.plan.sizing import (
    derive_shapes,
    kv_bytes_per_token,
    kv_bytes_per_token_per_gpu,
    round_batch_size,
    round_num_tokens,
    weight_bytes_total,
)

STORE = StoreLocation(bucket="default-bucket")
Spec = dict[str, Any]


def base(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
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
    body["spec"].update(spec)
    return body


# Calibration samples for the quantizations that calibrate.
CAL: dict[str, Any] = {"calibration": {"dataset": {"s3": {"uri": "s3://engines-a/calibration/"}}}}

# An operator configured with images for each release the tests name.
ALL_RELEASES = ImageCatalog(
    versions={v: ImagePair(builder=f"b:{v}", server=f"s:{v}") for v in ("1.0.0", "1.2.1", "1.3.0")}
)


def plan_of(obj: dict[str, Any], **kwargs: Any) -> Plan:
    kwargs.setdefault("default_store", STORE)
    return plan_object(obj, **kwargs)


def facts(name: str) -> Any:
    entry = lookup(name)
    assert entry is not None
    return entry.facts


# ---------------------------------------------------------------------------------------------------------------
# arithmetic


def test_kv_bytes_per_token_match_the_published_figures() -> None:
    # 2 (K, V) x 32 layers x 8 kv heads x 128 head size x 2 bytes = 131072 = 128 KiB
    assert kv_bytes_per_token(facts("llama-3.1-8b"), "auto") == 131072
    # 2 x 80 x 8 x 128 x 2 = 327680 = 320 KiB
    assert kv_bytes_per_token(facts("llama-3.1-70b"), "auto") == 327680
    # FP8 (and INT8) KV halves it.
    assert kv_bytes_per_token(facts("llama-3.1-8b"), "fp8") == 65536
    assert kv_bytes_per_token(facts("llama-3.1-70b"), "int8") == 163840
    # Llama 2 7B has no GQA: 2 x 32 x 32 x 128 x 2 = 524288
    assert kv_bytes_per_token(facts("llama-2-7b"), "auto") == 524288


def test_kv_per_gpu_splits_heads_and_layers_with_one_head_per_rank_at_least() -> None:
    f = facts("llama-3.1-70b")
    assert kv_bytes_per_token_per_gpu(f, "auto", tp=4, pp=1) == 327680 // 4
    assert kv_bytes_per_token_per_gpu(f, "auto", tp=1, pp=2) == 327680 // 2
    # tp 16 > 8 kv heads: each rank still keeps one head, 2 x 80 x 1 x 128 x 2.
    assert kv_bytes_per_token_per_gpu(f, "auto", tp=16, pp=1) == 40960


def test_weight_bytes_per_quantization() -> None:
    f = facts("llama-3.1-8b")  # 8,030,261,248 parameters
    assert weight_bytes_total(f, "none") == 16_060_522_496
    assert weight_bytes_total(f, "fp8") == 8_030_261_248
    assert weight_bytes_total(f, "int8_weight_only") == 8_030_261_248
    assert weight_bytes_total(f, "smoothquant") == 8_030_261_248
    assert weight_bytes_total(f, "int4_awq") == 4_015_130_624
    assert weight_bytes_total(f, "w4a8_awq") == 4_015_130_624
    assert weight_bytes_total(f, "nvfp4") == 4_015_130_624


def test_memory_estimate_worked_example() -> None:
    # Llama-3.1-8B BF16, TP2 on H100-80GB, maxBatchSize 64, maxNumTokens 8192, maxSeqLen 4096:
    #   weights     16,060,522,496 / 2                                  = 8,030,261,248
    #   activations 8192 tokens x 4096 hidden x 16 x 2 bytes             = 1,073,741,824
    #   runtime     64 x (128256 x 4 + 4096 x 8) + 1 GiB                 = 1,108,672,512
    #   KV/token/GPU 2 x 32 x (8/2) x 128 x 2 = 65536; x 4096 tokens     =   268,435,456
    #   required    8,030,261,248 + 1,073,741,824 + 1,108,672,512 + ceil(268,435,456 / 0.9)
    plan = plan_of(base(parallelism={"tensor": 2}))
    m = plan.memory
    assert m.weights_bytes == 8_030_261_248
    assert m.activation_bytes == 1_073_741_824
    assert m.runtime_bytes == 64 * (128256 * 4 + 4096 * 8) + GIB == 1_108_672_512
    assert m.kv_bytes_per_token == 131072
    assert m.kv_bytes_per_token_per_gpu == 65536
    assert m.min_kv_bytes == 268_435_456
    assert m.required_bytes_per_gpu == 8_030_261_248 + 1_073_741_824 + 1_108_672_512 + 298_261_618
    assert m.available_bytes_per_gpu == 81559 * MIB
    assert m.fits


def test_runtime_limits_shrink_the_memory_estimate() -> None:
    small = base()
    small["spec"]["serving"] = {"runtime": {"maxBatchSize": 8, "maxSeqLen": 1024}}
    assert plan_of(small).memory.required_bytes_per_gpu < plan_of(base()).memory.required_bytes_per_gpu


def test_continuous_kv_cache_reserves_every_slot() -> None:
    obj = base()
    obj["spec"]["build"].update(kvCacheType="continuous", pagedContextFmha=False)
    m = plan_of(obj).memory
    assert m.min_kv_bytes == 131072 * 4096 * 64


def test_rounding_rules() -> None:
    assert round_batch_size(Fraction(10)) == 64  # < 256: multiple of 32, at least 64
    assert round_batch_size(Fraction(65)) == 96
    assert round_batch_size(Fraction(255, 1)) == 256
    assert round_batch_size(Fraction(256)) == 256  # < 1024: multiple of 128
    assert round_batch_size(Fraction(257)) == 384
    assert round_batch_size(Fraction(1024)) == 1024  # else: multiple of 256
    assert round_batch_size(Fraction(1025)) == 1280
    assert round_num_tokens(Fraction(100)) == 2048  # < 4096: multiple of 256, at least 2048
    assert round_num_tokens(Fraction(2049)) == 2304
    assert round_num_tokens(Fraction(4096)) == 4096  # < 8192: multiple of 512
    assert round_num_tokens(Fraction(4097)) == 4608
    assert round_num_tokens(Fraction(8192)) == 8192  # else: multiple of 1024
    assert round_num_tokens(Fraction(8193)) == 9216


def test_trtllm_bench_derivation_worked_example() -> None:
    # Llama-3.1-8B BF16 on one H100-80GB (81559 MiB = 85,520,809,984 B), ISL mean 1024 / max 4096,
    # OSL mean 256 / max 1024:
    #   engine   = 8,030,261,248 x 2                      = 16,060,522,496
    #   free KV  = (85,520,809,984 - 16,060,522,496) x .95 = 65,987,273,113.6
    #   per req  = 2 x 32 x max(1, 8) x 128 x 2 x (1024 + 256) = 131072 x 1280 = 167,772,160
    #   requests = 65,987,273,113.6 / 167,772,160         = 393.31...
    #   raw_bs   = min(393.31, 4096) / pp 1 = 393.31 -> in [256, 1024): next multiple of 128 = 512
    #   raw_tok  = min(393.31 x (1 + 1024/256), 32768) = 1966.6 -> < 4096: multiple of 256, at least 2048 = 2048
    #   maxInputLen = 4096, maxSeqLen = 4096 + 1024 = 5120
    obj = base(traffic={"inputTokens": {"mean": 1024, "max": 4096}, "outputTokens": {"mean": 256, "max": 1024}})
    del obj["spec"]["build"]
    plan = plan_of(obj)
    assert plan.valid, plan.errors
    assert plan.shapes_from_traffic
    s = plan.shapes
    assert (s.max_batch_size, s.max_num_tokens, s.max_input_len, s.max_seq_len) == (512, 2048, 4096, 5120)
    d = derive_shapes(
        facts("llama-3.1-8b"),
        quantization="none",
        kv_cache_dtype="auto",
        tp=1,
        pp=1,
        gpu_memory_bytes=81559 * MIB,
        input_mean=1024,
        input_max=4096,
        output_mean=256,
        output_max=1024,
    )
    assert d.free_kv_bytes == Fraction(65_987_273_1136, 10)
    assert 393 < d.kv_max_requests < 394


def test_trtllm_bench_derivation_caps_and_pipeline() -> None:
    # Llama-3.1-8B FP8 + FP8 KV on H200 (143771 MiB), ISL 128 / OSL 128:
    #   free = (150,754,820,096 - 8,030,261,248) x .95 = 135,588,330,905.6
    #   per req = 2 x 32 x 8 x 128 x 1 x 256 = 16,777,216 -> 8081.6 requests, capped at 4096
    #   pp 1: raw_bs 4096 -> 4096; raw_tok min(4096 x 2, 32768) = 8192 -> multiple of 1024 = 8192
    #   pp 2: free doubles (still capped), raw_bs 4096 / 2 = 2048 -> 2048; raw_tok 4096 -> multiple of 512 = 4096
    kw: dict[str, Any] = {
        "quantization": "fp8",
        "kv_cache_dtype": "fp8",
        "tp": 1,
        "gpu_memory_bytes": 143771 * MIB,
        "input_mean": 128,
        "input_max": 512,
        "output_mean": 128,
        "output_max": 512,
    }
    one = derive_shapes(facts("llama-3.1-8b"), pp=1, **kw)
    two = derive_shapes(facts("llama-3.1-8b"), pp=2, **kw)
    assert one.shapes is not None and two.shapes is not None
    assert (one.shapes.max_batch_size, one.shapes.max_num_tokens) == (4096, 8192)
    assert (two.shapes.max_batch_size, two.shapes.max_num_tokens) == (2048, 4096)
    assert one.shapes.max_seq_len == 1024


def test_trtllm_bench_derivation_small_batch_and_warnings() -> None:
    # Llama-3.1-70B FP8 weights, BF16 KV, TP2 on H100-80GB, ISL 2048 / OSL 2048:
    #   free = (2 x 85,520,809,984 - 70,553,706,496) x .95 = 95,463,517,798.4
    #   per req = 2 x 80 x max(2, 8) x 128 x 2 x 4096 = 1,342,177,280 -> 71.1 requests
    #   raw_bs 71.1 -> < 256: multiple of 32 = 96 (>= 64); raw_tok 71.1 x 2 = 142 -> 2048
    d = derive_shapes(
        facts("llama-3.1-70b"),
        quantization="fp8",
        kv_cache_dtype="auto",
        tp=2,
        pp=1,
        gpu_memory_bytes=81559 * MIB,
        input_mean=2048,
        input_max=4096,
        output_mean=2048,
        output_max=4096,
        concurrency=100,
    )
    assert d.shapes is not None
    assert (d.shapes.max_batch_size, d.shapes.max_num_tokens) == (96, 2048)
    assert 71 < d.kv_max_requests < 72
    assert any("concurrency" in w for w in d.warnings)


def test_derivation_warns_below_ten_gib_and_32_requests() -> None:
    # Mistral 7B BF16 on a 1g.20gb slice of an H100: little room left for KV.
    obj = base(
        traffic={"inputTokens": {"mean": 2000, "max": 4000}, "outputTokens": {"mean": 500, "max": 1000}},
        model={
            "source": {"huggingFace": {"repo": "mistralai/Mistral-7B-v0.1", "revision": "26bca36"}},
            "catalog": "mistral-7b",
        },
        target={"gpu": "H100-80GB", "migProfile": "1g.20gb"},
    )
    del obj["spec"]["build"]
    plan = plan_of(obj)
    assert any("under 10 GiB" in w for w in plan.warnings), plan.warnings
    assert any("under 32" in w for w in plan.warnings), plan.warnings


# ---------------------------------------------------------------------------------------------------------------
# validation rules: each fails with the field named and a fix in the message


def _with(**changes: Any) -> dict[str, Any]:
    obj = base()
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = obj["spec"]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return obj


def _model(name: str, repo: str = "org/model") -> dict[str, Any]:
    return {"source": {"huggingFace": {"repo": repo, "revision": "abc1234"}}, "catalog": name}


FIXES = ("use ", "set ", "remove", "lower", "raise", "quantize", "target", "pick", "give", "pin")

RULES: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    (
        "fp8 on Ampere",
        _with(precision={"quantization": "fp8"}, target={"gpu": "A100-80GB"}),
        "spec.precision.quantization",
        {},
    ),
    (
        "w4a8 on Ampere",
        _with(precision={"quantization": "w4a8_awq"}, target={"gpu": "A100-40GB"}),
        "spec.precision.quantization",
        {},
    ),
    (
        "fp8 context fmha on Ampere",
        _with(build__fp8ContextFmha=True, target={"gpu": "A100-80GB"}),
        "spec.build.fp8ContextFmha",
        {},
    ),
    (
        "fp8 context fmha without fp8 quantization",
        _with(build__fp8ContextFmha=True),
        "spec.build.fp8ContextFmha",
        {},
    ),
    ("nvfp4 off Blackwell", _with(precision={"quantization": "nvfp4"}), "spec.precision.quantization", {}),
    (
        "int8 weight-only on Blackwell",
        _with(precision={"quantization": "int8_weight_only"}, target={"gpu": "B200"}),
        "spec.precision.quantization",
        {},
    ),
    (
        "smoothquant on Blackwell",
        _with(precision={"quantization": "smoothquant"}, target={"gpu": "B200"}),
        "spec.precision.quantization",
        {},
    ),
    (
        "int4 awq on Blackwell",
        _with(precision={"quantization": "int4_awq"}, target={"gpu": "B200"}),
        "spec.precision.quantization",
        {},
    ),
    (
        "fp8 kv cache on Ampere",
        _with(precision={"kvCacheDtype": "fp8"}, target={"gpu": "A100-80GB"}),
        "spec.precision.kvCacheDtype",
        {},
    ),
    ("tp x pp above the node", _with(parallelism={"tensor": 8, "pipeline": 2}), "spec.parallelism.tensor", {}),
    ("tp above an L40S node", _with(parallelism={"tensor": 8}, target={"gpu": "L40S"}), "spec.parallelism.tensor", {}),
    (
        "tp on a MIG slice",
        _with(parallelism={"tensor": 2}, target={"gpu": "H100-80GB", "migProfile": "3g.40gb"}),
        "spec.parallelism.tensor",
        {},
    ),
    (
        "pp on a MIG slice",
        _with(parallelism={"pipeline": 2}, target={"gpu": "H100-80GB", "migProfile": "3g.40gb"}),
        "spec.parallelism.pipeline",
        {},
    ),
    ("70B BF16 on one GPU", _with(model=_model("llama-3.1-70b")), "spec.target.gpu", {}),
    (
        "8B BF16 on a 1g.10gb slice",
        _with(target={"gpu": "H100-80GB", "migProfile": "1g.10gb"}),
        "spec.target.migProfile",
        {},
    ),
    (
        "maxSeqLen beyond the model",
        _with(model=_model("llama-2-7b"), build__maxSeqLen=8192),
        "spec.build.maxSeqLen",
        {},
    ),
    (
        "traffic beyond the model",
        {
            **base(
                model=_model("llama-2-7b"),
                traffic={"inputTokens": {"mean": 500, "max": 3000}, "outputTokens": {"mean": 200, "max": 2000}},
            ),
        },
        "spec.traffic.outputTokens.max",
        {"drop_build": True},
    ),
    ("maxInputLen beyond maxSeqLen", _with(build__maxInputLen=8192), "spec.build.maxInputLen", {}),
    (
        "runtime maxBatchSize above built",
        _with(serving={"runtime": {"maxBatchSize": 65}}),
        "spec.serving.runtime.maxBatchSize",
        {},
    ),
    (
        "runtime maxNumTokens above built",
        _with(serving={"runtime": {"maxNumTokens": 9000}}),
        "spec.serving.runtime.maxNumTokens",
        {},
    ),
    (
        "runtime maxSeqLen above built",
        _with(serving={"runtime": {"maxSeqLen": 5000}}),
        "spec.serving.runtime.maxSeqLen",
        {},
    ),
    ("tp does not divide heads", _with(parallelism={"tensor": 3}), "spec.parallelism.tensor", {}),
    (
        "tp does not divide Qwen's 28 heads",
        _with(model=_model("qwen2.5-7b"), parallelism={"tensor": 8}),
        "spec.parallelism.tensor",
        {},
    ),
    (
        "tp and kv heads do not divide one another",
        _with(
            model={
                "source": {"s3": {"uri": "s3://w/m/"}},
                "architecture": {
                    "architecture": "LlamaForCausalLM",
                    "numLayers": 4,
                    "hiddenSize": 1024,
                    "numAttentionHeads": 32,
                    "numKeyValueHeads": 6,
                    "vocabSize": 1000,
                    "parameterCount": 100_000_000,
                    "maxPositionEmbeddings": 4096,
                },
            },
            parallelism={"tensor": 4},
        ),
        "spec.parallelism.tensor",
        {},
    ),
    (
        "pp above layers",
        _with(model=_model("llama-2-7b"), parallelism={"pipeline": 64}),
        "spec.parallelism.pipeline",
        {"gpus_per_node": 64},
    ),
    (
        "pytorch with a TensorRT flag",
        _with(backend="pytorch", build__multipleProfiles=True),
        "spec.build.multipleProfiles",
        {},
    ),
    (
        "pytorch with smoothquant",
        _with(backend="pytorch", precision={"quantization": "smoothquant"}),
        "spec.precision.quantization",
        {},
    ),
    ("tensorrt on 1.3", _with(image="nvcr.io/nvidia/tensorrt-llm/release:1.3.0rc1"), "spec.image", {}),
    ("tensorrt on 1.0, outside the contract's release line", _with(trtllmVersion="1.0.0"), "spec.trtllmVersion", {}),
    ("tensorrt on 0.21", _with(trtllmVersion="0.21.0"), "spec.trtllmVersion", {}),
    (
        "version not in the tag",
        _with(image="nvcr.io/nvidia/tensorrt-llm/release@sha256:" + "a" * 64),
        "spec.trtllmVersion",
        {},
    ),
    ("unknown catalog model", _with(model=_model("llama-9-1t")), "spec.model.catalog", {}),
    (
        "MIG profile of another GPU",
        _with(target={"gpu": "A100-40GB", "migProfile": "3g.40gb"}),
        "spec.target.migProfile",
        {},
    ),
    ("MIG on L40S", _with(target={"gpu": "L40S", "migProfile": "1g.10gb"}), "spec.target.migProfile", {}),
    ("no store anywhere", _with(), "spec.store", {"no_store": True}),
    (
        "traffic and shapes together",
        base(traffic={"inputTokens": {"mean": 1, "max": 2}, "outputTokens": {"mean": 1, "max": 2}}),
        "spec.traffic",
        {},
    ),
    (
        "traffic with no KV room",
        base(
            model=_model("llama-3.1-70b"),
            target={"gpu": "L40S"},
            traffic={"inputTokens": {"mean": 100, "max": 200}, "outputTokens": {"mean": 100, "max": 200}},
        ),
        "spec.traffic",
        {"drop_build": True},
    ),
    (
        "paged context FMHA with a continuous cache",
        _with(build__kvCacheType="continuous", build__pagedContextFmha=True),
        "spec.build.pagedContextFmha",
        {},
    ),
    (
        "head size not derivable",
        _with(
            model={
                "source": {"s3": {"uri": "s3://w/m/"}},
                "architecture": {
                    "architecture": "LlamaForCausalLM",
                    "numLayers": 4,
                    "hiddenSize": 1000,
                    "numAttentionHeads": 3,
                    "vocabSize": 1000,
                    "parameterCount": 100_000_000,
                    "maxPositionEmbeddings": 4096,
                },
            }
        ),
        "spec.model.architecture.headDim",
        {},
    ),
]


@pytest.mark.parametrize(("what", "obj", "field", "opts"), RULES, ids=[r[0] for r in RULES])
def test_rule_names_the_field_and_the_fix(what: str, obj: dict[str, Any], field: str, opts: dict[str, Any]) -> None:
    obj = copy.deepcopy(obj)
    if opts.get("drop_build"):
        obj["spec"].pop("build", None)
    if opts.get("no_store"):
        obj["spec"].pop("store", None)
    plan = plan_object(
        obj,
        default_store=None if opts.get("no_store") else STORE,
        gpus_per_node=opts.get("gpus_per_node"),
    )
    assert not plan.valid
    assert plan.build_request is None
    matching = [e for e in plan.errors if e.field == field]
    assert matching, f"{what}: no error on {field}: {plan.errors}"
    assert any(f in e.message for e in matching for f in FIXES), matching


def test_gpus_per_node_argument_overrides_the_class_default() -> None:
    obj = _with(parallelism={"tensor": 8}, target={"gpu": "L40S"}, model=_model("llama-3.1-70b"))
    assert any(e.field == "spec.parallelism.tensor" for e in plan_of(obj).errors)
    assert plan_of(obj, gpus_per_node=8).valid, plan_of(obj, gpus_per_node=8).errors


def test_valid_combinations_pass() -> None:
    for obj in (
        _with(precision={"quantization": "fp8", "kvCacheDtype": "fp8", **CAL}, build__fp8ContextFmha=True),
        _with(precision={"quantization": "nvfp4", **CAL}, target={"gpu": "B200"}),
        _with(precision={"quantization": "int4_awq", **CAL}, target={"gpu": "A100-40GB"}),
        _with(precision={"quantization": "fp8", **CAL}, target={"gpu": "L40S"}),
        _with(precision={"quantization": "int4_awq", "kvCacheDtype": "int8", **CAL}, target={"gpu": "A100-80GB"}),
        _with(parallelism={"tensor": 8}),
        _with(target={"gpu": "H100-80GB", "migProfile": "3g.40gb"}),
        _with(trtllmVersion="1.2.1", image="registry.local/trtllm@sha256:" + "b" * 64),
        _with(backend="pytorch", trtllmVersion="1.0.0"),
        _with(backend="pytorch", image="nvcr.io/nvidia/tensorrt-llm/release:1.3.0"),
    ):
        plan = plan_of(obj, images=ALL_RELEASES)
        assert plan.valid, plan.errors


# ---------------------------------------------------------------------------------------------------------------
# schema errors through plan_object


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        (
            lambda s: s["model"]["source"]["huggingFace"].pop("revision"),
            "spec.model.source.huggingFace.revision",
            "required",
        ),
        (lambda s: s["model"]["source"].update(s3={"uri": "s3://b/m/"}), "spec.model.source", "exactly one"),
        (lambda s: s["model"].pop("catalog"), "spec.model", "exactly one"),
        (lambda s: s["build"].update(maxBatchSzie=3), "spec.build.maxBatchSzie", "did you mean maxBatchSize"),
        (lambda s: s["target"].update(gpu="T4"), "spec.target.gpu", "H100-80GB"),
        (lambda s: s.update(parallelism={"tensor": 0}), "spec.parallelism.tensor", "greater than or equal to 1"),
        (
            lambda s: s.update(serving={"runtime": {"kvCacheFreeGpuMemoryFraction": 1.5}}),
            "spec.serving.runtime.kvCacheFreeGpuMemoryFraction",
            "less than 1",
        ),
        (
            lambda s: s.update(traffic={"inputTokens": {"mean": 10, "max": 5}, "outputTokens": {"mean": 1, "max": 1}}),
            "spec.traffic.inputTokens",
            "raise max",
        ),
        (lambda s: s.update(serving={"env": [{"value": "x"}]}), "spec.serving.env[0].name", "required"),
    ],
)
def test_schema_errors_have_camel_case_paths(change: Callable[[Spec], object], field: str, fragment: str) -> None:
    obj = base()
    change(obj["spec"])
    plan = plan_object(obj, default_store=STORE)
    assert not plan.valid
    assert [e for e in plan.errors if e.field == field and fragment in e.message], plan.errors


def test_plan_object_never_raises() -> None:
    for junk in (None, [], "x", {}, {"spec": None}, {"spec": {"model": 3}}, {"kind": "LLMEngine", "spec": {}}):
        plan = plan_object(junk)
        assert not plan.valid and plan.errors


def test_make_plan_never_raises_on_a_constructed_model() -> None:
    broken = LLMEngine.model_construct(spec=None)
    plan = make_plan(broken)
    assert not plan.valid and plan.errors[0].field == "spec"


def test_unknown_compiler_is_an_error() -> None:
    assert any(e.field == "compiler" for e in plan_of(base(), compiler="gcc").errors)


# ---------------------------------------------------------------------------------------------------------------
# plan fields


def test_plan_fields_for_a_valid_engine() -> None:
    obj = _with(parallelism={"tensor": 2, "pipeline": 2}, serving={"runtime": {"maxBatchSize": 32}})
    plan = plan_of(obj, compiler="test", test_engine_bytes=1234)
    assert plan.valid, plan.errors
    assert plan.gpu.name == "H100-80GB" and plan.gpu.sm == "9.0"
    assert plan.gpu.product_labels == ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"]
    assert plan.gpu_resource == "nvidia.com/gpu" and plan.gpu_count == 4 and plan.mig_profile is None
    assert plan.runtime_args == [
        "--max_batch_size",
        "32",
        "--max_num_tokens",
        "8192",
        "--max_seq_len",
        "4096",
        "--kv_cache_free_gpu_memory_fraction",
        "0.9",
        "--tp_size",
        "2",
        "--pp_size",
        "2",
    ]
    req = plan.build_request
    assert req is not None
    assert req.engine_digest == plan.engine_digest
    assert req.compiler == "test" and req.test_engine_bytes == 1234
    assert (req.tp_size, req.pp_size, req.world_size) == (2, 2, 4)
    assert req.store.bucket == "engines-a"  # the engine's own store wins over the default
    assert req.model.hugging_face_repo == "meta-llama/Llama-3.1-8B-Instruct" and req.model.revision == "0e9e39f"
    assert req.model_facts["numKeyValueHeads"] == 8
    assert req.engine.build_config is not None
    plugins = req.engine.build_config.plugin_config
    assert plugins.paged_kv_cache is True and plugins.use_paged_context_fmha is True
    assert req.engine.mapping.world_size == 4 and plugins.nccl_plugin == req.dtype
    assert (req.gpu_class, req.sm, req.trtllm_version) == ("H100-80GB", "9.0", "1.2.1")
    assert req.shapes == plan.shapes


def test_mig_plan_requests_one_slice() -> None:
    plan = plan_of(_with(target={"gpu": "H100-80GB", "migProfile": "3g.40gb"}))
    assert plan.valid
    assert plan.gpu_resource == "nvidia.com/mig-3g.40gb"
    assert plan.gpu_count == 1 and plan.mig_profile == "3g.40gb"
    assert plan.memory.available_bytes_per_gpu == round(39.50 * GIB)


def test_default_store_is_used_when_the_engine_has_none() -> None:
    obj = base()
    del obj["spec"]["store"]
    plan = plan_of(obj)
    assert plan.build_request is not None and plan.build_request.store == STORE


def test_smoothquant_is_named_for_the_builder() -> None:
    plan = plan_of(_with(precision={"quantization": "smoothquant", **CAL}, target={"gpu": "A100-80GB"}))
    assert plan.build_request is not None and plan.build_request.quantization == "int8_smoothquant"


def test_invalid_plan_still_reports_what_it_can() -> None:
    plan = plan_of(_with(precision={"quantization": "fp8"}, target={"gpu": "A100-80GB"}))
    assert not plan.valid and plan.engine_digest and plan.shapes.max_seq_len == 4096


# ---------------------------------------------------------------------------------------------------------------
# catalog and GPU tables


def test_catalog_facts_are_consistent() -> None:
    assert set(CATALOG) == {
        "llama-2-7b",
        "llama-3.1-8b",
        "llama-3.1-70b",
        "mistral-7b",
        "mixtral-8x7b",
        "qwen2.5-7b",
        "qwen2.5-72b",
    }
    for entry in CATALOG.values():
        f = entry.facts
        assert f.head_dim * f.num_attention_heads == f.hidden_size
        assert f.num_attention_heads % f.num_key_value_heads == 0
    assert lookup(" Mixtral-8x7B ") is CATALOG["mixtral-8x7b"]


def test_gpu_table() -> None:
    assert {n: g.sm for n, g in GPU_CLASSES.items()} == {
        "A100-40GB": "8.0",
        "A100-80GB": "8.0",
        "L40S": "8.9",
        "H100-80GB": "9.0",
        "H100-NVL": "9.0",
        "H200": "9.0",
        "B200": "10.0",
    }
    h100 = GPU_CLASSES["H100-80GB"]
    assert h100.memory_bytes == 81559 * MIB
    assert h100.mig_profiles["3g.40gb"].memory_bytes == round(39.50 * GIB)
    assert h100.mig_profiles["1g.10gb"].memory_bytes == round(9.75 * GIB)
    assert GPU_CLASSES["L40S"].gpus_per_node == 4 and not GPU_CLASSES["L40S"].mig_capable
    assert set(GPU_CLASSES["A100-40GB"].mig_profiles) >= {"1g.5gb", "3g.20gb", "7g.40gb"}
    assert h100.mig_product_labels("1g.10gb")[0] == "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb"
    for g in GPU_CLASSES.values():
        for p in g.mig_profiles.values():
            assert 0 < p.memory_bytes < g.memory_bytes


# ---------------------------------------------------------------------------------------------------------------
# compare


def _pair(change: Callable[[Spec], object]) -> tuple[Plan, Plan, LLMEngine, LLMEngine]:
    old_obj, new_obj = base(), base()
    change(new_obj["spec"])
    old, new = parse_engine(old_obj), parse_engine(new_obj)
    return make_plan(old), make_plan(new), old, new


@pytest.mark.parametrize(
    ("change", "action"),
    [
        (lambda s: None, "nothing"),
        (lambda s: s.update(rebuildPolicy={"mode": "Auto"}), "nothing"),
        (lambda s: s["build"].update(maxBeamWidth=1), "nothing"),
        (lambda s: s.update(serving={"replicas": 3}), "rollout"),
        (lambda s: s.update(serving={"runtime": {"maxBatchSize": 8}}), "rollout"),
        (lambda s: s.update(serving={"env": [{"name": "A", "value": "1"}]}), "rollout"),
        (lambda s: s.update(serving={"port": 9000}), "rollout"),
        (lambda s: s.update(serving={"podAnnotations": {"a": "b"}}), "rollout"),
        (lambda s: s.update(serving={"resources": {"limits": {"memory": "8Gi"}}}), "rollout"),
        (lambda s: s["target"].update(tolerations=[{"operator": "Exists"}]), "rollout"),
        (lambda s: s["target"].update(migProfile="3g.40gb"), "rollout"),
        (lambda s: s["model"].update(tokenizer="org/tok"), "rollout"),
        (lambda s: s["store"].update(bucket="engines-b"), "rollout"),
        (lambda s: s["model"]["source"]["huggingFace"].update(revision="fff0000"), "rebuild"),
        (lambda s: s["build"].update(maxSeqLen=8192), "rebuild"),
        (lambda s: s.update(image="nvcr.io/nvidia/tensorrt-llm/release:1.2.0"), "rebuild"),
    ],
)
def test_compare(change: Callable[[Spec], object], action: str) -> None:
    assert compare(*_pair(change)) == action


def test_a_calibrating_build_without_calibration_data_is_refused_before_any_gpu_time() -> None:
    for precision in ({"quantization": "fp8"}, {"quantization": "int4_awq"}, {"kvCacheDtype": "fp8"}):
        plan = plan_of(_with(precision=precision))
        assert [e.field for e in plan.errors] == ["spec.precision.calibration"], precision
        assert "Hugging Face Hub" in plan.errors[0].message and "s3://" in plan.errors[0].message


def test_calibration_data_reaches_the_build_request_only_when_the_build_calibrates() -> None:
    cal = {"dataset": {"huggingFace": {"repo": "org/text", "revision": "abc123"}}, "samples": 256, "maxSeqLength": 1024}
    plan = plan_of(_with(precision={"quantization": "fp8", "calibration": cal}))
    assert plan.valid, plan.errors
    assert plan.build_request is not None and plan.build_request.calibration is not None
    c = plan.build_request.calibration
    assert (c.hugging_face_repo, c.revision, c.s3_uri) == ("org/text", "abc123", None)
    e = plan.build_request.engine.calibration
    assert e is not None and (e.calib_batches, e.calib_max_seq_length) == (256, 1024)
    unquantized = plan_of(_with(precision={"calibration": cal}))
    assert unquantized.valid and unquantized.build_request is not None
    assert unquantized.build_request.calibration is None
    assert any("calibration is ignored" in w for w in unquantized.warnings)
    assert unquantized.engine_digest == plan_of(base()).engine_digest


@pytest.mark.parametrize(
    ("precision", "build", "gpu", "field", "rule", "fix"),
    [
        # F2: FP8 context FMHA without an FP8-capable quantization.
        (
            {"quantization": "int4_awq", **CAL},
            {"fp8ContextFmha": True},
            "H100-80GB",
            "fp8ContextFmha",
            "F2",
            "use quantization fp8",
        ),
        # F4: forced on by an FP8 KV cache with paged context FMHA; off without one.
        (
            {"quantization": "fp8", "kvCacheDtype": "fp8", **CAL},
            {"fp8ContextFmha": False},
            "H100-80GB",
            "fp8ContextFmha",
            "F4",
            "remove fp8ContextFmha",
        ),
        (
            {"quantization": "fp8", **CAL},
            {"fp8ContextFmha": True},
            "H100-80GB",
            "fp8ContextFmha",
            "F4",
            "set kvCacheDtype fp8",
        ),
        # F2: an FP8 KV cache without FP8 quantization drops paged context FMHA.
        (
            {"kvCacheDtype": "fp8", **CAL},
            {"pagedContextFmha": True},
            "H100-80GB",
            "pagedContextFmha",
            "F2",
            "kvCacheDtype auto",
        ),
        # F6: an INT8 KV cache drops paged context FMHA.
        (
            {"quantization": "int4_awq", "kvCacheDtype": "int8", **CAL},
            {"pagedContextFmha": True},
            "A100-80GB",
            "pagedContextFmha",
            "F6",
            "pagedContextFmha false",
        ),
        # F1: context FMHA off takes paged context FMHA with it.
        (
            {},
            {"contextFmha": False, "pagedContextFmha": True},
            "H100-80GB",
            "pagedContextFmha",
            "F1",
            "contextFmha true",
        ),
        # T3: maxNumTokens above maxBatchSize x maxSeqLen is clipped.
        (
            {},
            {"maxBatchSize": 1, "maxSeqLen": 2048, "maxInputLen": 1024, "maxNumTokens": 8192},
            "H100-80GB",
            "maxNumTokens",
            "T3",
            "set it to 2048",
        ),
        # T1: without remove_input_padding maxNumTokens is maxBatchSize x maxSeqLen.
        ({}, {"removeInputPadding": False, "maxNumTokens": 4096}, "H100-80GB", "maxNumTokens", "T1", "set it to"),
    ],
)
def test_what_upstream_would_override_is_refused_naming_the_field_the_rule_and_the_fix(
    precision: dict[str, Any], build: dict[str, Any], gpu: str, field: str, rule: str, fix: str
) -> None:
    obj = base()
    obj["spec"]["precision"] = precision
    obj["spec"]["build"] = {**obj["spec"]["build"], **build}
    obj["spec"]["target"] = {"gpu": gpu}
    plan = plan_of(obj)
    errors = [e for e in plan.errors if e.field == f"spec.build.{field}"]
    assert errors, plan.errors
    assert f"({rule}:" in errors[0].message and fix in errors[0].message, errors[0].message
    assert plan.build_request is None


@pytest.mark.parametrize(
    ("spec", "field", "needle"),
    [
        # W1/W2 in build(): integer quantization refused on SM 10.x (after conversion would have spent GPU time).
        (
            {"precision": {"quantization": "int8_weight_only"}, "target": {"gpu": "B200"}},
            "spec.precision.quantization",
            "W1",
        ),
        (
            {"precision": {"quantization": "smoothquant", **CAL}, "target": {"gpu": "B200"}},
            "spec.precision.quantization",
            "W2",
        ),
        (
            {"precision": {"quantization": "nvfp4", "kvCacheDtype": "int8", **CAL}, "target": {"gpu": "B200"}},
            "spec.precision.kvCacheDtype",
            "W1",
        ),
        # The model-class route: what a family's code refuses or has no path for.
        (
            {"precision": {"quantization": "int8_weight_only", "kvCacheDtype": "fp8", **CAL}},
            "spec.precision.kvCacheDtype",
            "from_hugging_face",
        ),
        (
            {"precision": {"kvCacheDtype": "int8", **CAL}, "target": {"gpu": "A100-80GB"}},
            "spec.precision.kvCacheDtype",
            "cnn_dailymail",
        ),
        (
            {
                "model": {
                    "source": {"s3": {"uri": "s3://m/x/"}},
                    "architecture": {
                        "architecture": "FalconForCausalLM",
                        "numLayers": 2,
                        "hiddenSize": 64,
                        "numAttentionHeads": 2,
                        "vocabSize": 100,
                        "parameterCount": 1000,
                        "maxPositionEmbeddings": 4096,
                    },
                }
            },
            "spec.model.architecture",
            "LlamaForCausalLM",
        ),
        (
            {"backend": "pytorch", "precision": {"quantization": "fp8", **CAL}},
            "spec.precision.quantization",
            "pre-quantized",
        ),
    ],
)
def test_what_the_build_route_or_upstream_refuses_is_refused_before_any_gpu_time(
    spec: dict[str, Any], field: str, needle: str
) -> None:
    obj = base()
    obj["spec"].update(spec)
    plan = plan_of(obj)
    errors = [e for e in plan.errors if e.field == field]
    assert errors and needle in errors[0].message, plan.errors


def test_memory_advice_offers_only_fixes_valid_for_the_gpu_and_precision_with_their_numbers() -> None:
    big = _with(
        model=_model("llama-3.1-70b"),
        target={"gpu": "A100-80GB"},
        build={"maxBatchSize": 16, "maxSeqLen": 8192, "maxInputLen": 4096},
    )
    (err,) = [e for e in plan_of(big).errors if e.field == "spec.target.gpu"]
    assert "fp8" not in err.message  # an A100 has no FP8
    assert "quantization int4_awq (" in err.message and "spec.parallelism.tensor 2 (" in err.message
    assert "GiB" in err.message.split("quantization int4_awq (")[1]
    fp8 = _with(
        model=_model("llama-3.1-70b"),
        precision={"quantization": "fp8", **CAL},
        target={"gpu": "H100-80GB"},
        build={"maxBatchSize": 64, "maxSeqLen": 131072, "maxInputLen": 8192},
    )
    (err,) = [e for e in plan_of(fp8).errors if e.field == "spec.target.gpu"]
    assert "quantization fp8" not in err.message  # it is fp8 already
    mig = _with(
        target={"gpu": "H100-80GB", "migProfile": "1g.10gb"},
        build={"maxBatchSize": 8, "maxSeqLen": 8192, "maxInputLen": 4096},
    )
    (err,) = [e for e in plan_of(mig).errors if e.field == "spec.target.migProfile"]
    assert "parallelism.tensor" not in err.message and "a larger spec.target.migProfile" in err.message


def test_a_shape_beyond_tensorrts_dimensions_is_blamed_on_its_field_not_the_gpu() -> None:
    plan = plan_of(_with(build={"maxBatchSize": 10**12}))
    assert [e.field for e in plan.errors] == ["spec.build.maxBatchSize"]
    assert "32-bit" in plan.errors[0].message


def test_a_branch_like_revision_warns() -> None:
    obj = base()
    obj["spec"]["model"]["source"]["huggingFace"]["revision"] = "main"
    assert any("looks like a branch" in w for w in plan_of(obj).warnings)
    for pinned in ("0e9e39f249a16976918f6564b8830bc894c89659", "v1.2.0"):
        obj["spec"]["model"]["source"]["huggingFace"]["revision"] = pinned
        assert not any("looks like a branch" in w for w in plan_of(obj).warnings)
