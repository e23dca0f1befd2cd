"""Rules a spec must meet to build and serve. Each returns FieldErrors that name the field and say how to fix it.

The rules are documented in docs/planning.md; keep the two in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmengine.api.artifacts import BuildShapes
from llmengine.api.config import ImageCatalog
from llmengine.api.v1alpha1 import FieldError, LLMEngineSpec
from llmengine.plan.catalog import ModelFacts
from llmengine.plan.engine_config import quant_settings
from llmengine.plan.gpus import GpuClass, MigProfile, parse_sm
from llmengine.plan.trtllm_rules import requires_calibration

SM_FP8 = (8, 9)
SM_BLACKWELL = (10, 0)
# The TensorRT engine backend exists from 1.0 up to (not including) 1.3, where upstream removed it.
TENSORRT_MIN = (1, 0)
TENSORRT_BELOW = (1, 3)
# The release line the TensorRT-LLM contract (llmengine/data/trtllm) was read from: what the builder, the server
# and the benchmark hand upstream is checked against 1.2, and 1.0/1.1 define some of it differently.
CONTRACT_LINE = (1, 2)

# Quantizations and KV cache dtypes whose build calibrates on sample text.
AWQ_QUANTS = ("int4_awq", "w4a8_awq")
# Build flags that only mean something to trtllm-build, with their defaults.
TENSORRT_ONLY_FEATURES = {
    "fp8_context_fmha": None,
    "paged_context_fmha": None,
    "multiple_profiles": False,
    "strip_plan": False,
    "weight_streaming": False,
    "kv_cache_type": "paged",
    "context_fmha": True,
    "remove_input_padding": True,
}

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Resolved:
    """A spec with its references resolved, as the rules see it."""

    spec: LLMEngineSpec
    facts: ModelFacts | None
    gpu: GpuClass
    mig: MigProfile | None
    shapes: BuildShapes | None
    shapes_from_traffic: bool
    version: str | None
    gpus_per_node: int
    images: ImageCatalog


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def image_tag(image: str) -> str | None:
    """The tag of an image reference (registry ports and digests aside), or None."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def parse_version(version: str) -> tuple[int, int, int] | None:
    m = _VERSION.match(version.strip())
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def resolve_version(spec: LLMEngineSpec, default_version: str) -> tuple[str | None, list[FieldError]]:
    """The TensorRT-LLM version: spec.trtllmVersion, else the (deprecated) spec.image tag, else the default."""
    if spec.trtllm_version:
        return spec.trtllm_version, []
    if spec.image is None:
        return default_version, []
    tag = image_tag(spec.image)
    if tag is not None and parse_version(tag) is not None:
        return tag, []
    return None, [
        FieldError(
            "spec.trtllmVersion",
            f"cannot tell the TensorRT-LLM version from image {spec.image!r} (no version tag): set "
            "spec.trtllmVersion, e.g. 1.2.1, and remove spec.image",
        )
    ]


def check_images(r: Resolved) -> list[FieldError]:
    """The version must have builder and server images configured: they are what builds and serves it."""
    if r.version is None or r.images.resolve(r.version) is not None:
        return []
    field = "spec.trtllmVersion" if r.spec.trtllm_version or r.spec.image is None else "spec.image"
    return [
        FieldError(
            field,
            f"TensorRT-LLM {r.version} has no builder and server images in this operator (configured: "
            f"{r.images.configured()}): use one of those, or add images for {r.version} to the chart's "
            "images.trtllm",
        )
    ]


def check_integer_range(spec: LLMEngineSpec) -> list[FieldError]:
    """Integers beyond int64, which Kubernetes cannot store and the memory arithmetic would overflow on."""
    out: list[FieldError] = []

    def walk(value: object, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            out.append(FieldError(path, f"is out of range: Kubernetes integers are at most {INT64_MAX}"))

    walk(spec.model_dump(by_alias=True, exclude_none=True), "spec")
    return out


def check_version(r: Resolved) -> list[FieldError]:
    if r.version is None:
        return []
    parsed = parse_version(r.version)
    field = "spec.image" if r.spec.image is not None and not r.spec.trtllm_version else "spec.trtllmVersion"
    if parsed is None:
        return [FieldError(field, f"{r.version!r} is not a version like 1.2.1: set spec.trtllmVersion")]
    if r.spec.backend == "tensorrt" and not (TENSORRT_MIN <= parsed[:2] < TENSORRT_BELOW):
        return [
            FieldError(
                field,
                f"the tensorrt backend needs TensorRT-LLM 1.0-1.2.x (got {r.version}; 1.3 removed engine builds): "
                "set spec.trtllmVersion to a 1.2.x release, e.g. 1.2.1, or set spec.backend: pytorch",
            )
        ]
    if r.spec.backend == "tensorrt" and parsed[:2] != CONTRACT_LINE:
        return [
            FieldError(
                field,
                f"engines are built against TensorRT-LLM 1.2.x's build, serve and bench options (got {r.version}; "
                "1.0 and 1.1 define some of them differently): set spec.trtllmVersion to a 1.2.x release, e.g. "
                "1.2.1",
            )
        ]
    if r.spec.backend == "pytorch" and parsed[:2] < TENSORRT_MIN:
        return [
            FieldError(field, f"the pytorch backend needs TensorRT-LLM 1.0 or later (got {r.version}): use a 1.x image")
        ]
    return []


def check_precision(r: Resolved) -> list[FieldError]:
    """What the GPU's compute capability supports."""
    p, b, sm = r.spec.precision, r.spec.build, parse_sm(r.gpu.sm)
    where = f"{r.gpu.name} (SM {r.gpu.sm})"
    out: list[FieldError] = []
    q = "spec.precision.quantization"
    if p.quantization in ("fp8", "w4a8_awq") and sm < SM_FP8:
        out.append(
            FieldError(
                q,
                f"{p.quantization} needs FP8 hardware (SM 8.9+), {where} has none: use int4_awq or "
                "int8_weight_only, or target L40S, H100-80GB, H100-NVL, H200 or B200",
            )
        )
    if p.quantization == "nvfp4" and sm < SM_BLACKWELL:
        out.append(FieldError(q, f"nvfp4 needs Blackwell (SM 10.0), {where} is not: use fp8 or int4_awq, or B200"))
    if p.kv_cache_dtype == "fp8" and sm < SM_FP8:
        out.append(
            FieldError(
                "spec.precision.kvCacheDtype",
                f"an fp8 KV cache needs SM 8.9+, {where} has no FP8: use kvCacheDtype "
                + ("int8 or auto" if p.quantization in ("int4_awq", "smoothquant") else "auto"),
            )
        )
    if b.paged_context_fmha and b.kv_cache_type != "paged":
        out.append(
            FieldError(
                "spec.build.pagedContextFmha",
                "paged context FMHA needs kvCacheType paged: set kvCacheType paged or pagedContextFmha false",
            )
        )
    return out


def calibrates(spec: LLMEngineSpec) -> bool:
    """Whether the build measures scales on sample text (upstream's QuantConfig._requires_calibration)."""
    return requires_calibration(quant_settings(spec))


def check_calibration(r: Resolved) -> list[FieldError]:
    """A calibrating build needs its samples named: upstream would otherwise download a dataset from the Hub."""
    p = r.spec.precision
    if not calibrates(r.spec) or p.calibration is not None:
        return []
    what = (
        f"quantization {p.quantization}"
        if requires_calibration(quant_settings(r.spec).model_copy(update={"kv_cache_quant_algo": None}))
        else f"kvCacheDtype {p.kv_cache_dtype}"
    )
    return [
        FieldError(
            "spec.precision.calibration",
            f"{what} calibrates on sample text, and without a dataset TensorRT-LLM downloads one from the Hugging "
            "Face Hub during the build: set spec.precision.calibration.dataset to a pinned Hugging Face dataset "
            "(huggingFace: {repo, revision}) or an s3:// prefix whose train split has a text column",
        )
    ]


_COMMIT = re.compile(r"^[0-9a-f]{7,64}$")
_TAG = re.compile(r"^v?\d+(\.\d+)+([.+-][0-9A-Za-z.]+)?$")


def revision_warnings(spec: LLMEngineSpec) -> list[str]:
    """A revision that looks like a branch: the files can change under an engine built from them."""
    out = []
    hf = spec.model.source.hugging_face
    pins = [("spec.model.source.huggingFace.revision", hf.revision.strip() if hf else None)]
    cal = spec.precision.calibration
    if cal is not None and cal.dataset.hugging_face is not None:
        pins.append(("spec.precision.calibration.dataset.huggingFace.revision", cal.dataset.hugging_face.revision))
    for field, rev in pins:
        if rev and not _COMMIT.match(rev) and not _TAG.match(rev):
            out.append(
                f"{field} {rev!r} looks like a branch: what it names can change under a built engine (the "
                "identity keeps the name, not the content); pin a commit SHA"
            )
    return out


def calibration_warnings(r: Resolved) -> list[str]:
    c = r.spec.precision.calibration
    if c is not None and calibrates(r.spec) and r.spec.precision.quantization in AWQ_QUANTS and c.samples > 32:
        return [
            f"spec.precision.calibration.samples is {c.samples}, but TensorRT-LLM calibrates AWQ on at most 32 "
            "samples: the engine is the same as with 32"
        ]
    if c is None or calibrates(r.spec):
        return []
    return [
        "spec.precision.calibration is ignored: quantization "
        f"{r.spec.precision.quantization} with kvCacheDtype {r.spec.precision.kv_cache_dtype} does not calibrate"
    ]


def check_backend(r: Resolved) -> list[FieldError]:
    """The pytorch backend has no engine build: TensorRT build flags and conversion-only quantizations fail."""
    if r.spec.backend != "pytorch":
        return []
    out: list[FieldError] = []
    fix = "remove it or set spec.backend: tensorrt"
    for name, default in TENSORRT_ONLY_FEATURES.items():
        if getattr(r.spec.build, name) != default:
            out.append(FieldError(f"spec.build.{_camel(name)}", f"is a TensorRT engine build flag: {fix}"))
    return out


def tensor_fits(f: ModelFacts, tp: int) -> bool:
    """Tensor parallelism splits the attention heads, and the KV heads and tp divide one another."""
    return f.num_attention_heads % tp == 0 and (f.num_key_value_heads % tp == 0 or tp % f.num_key_value_heads == 0)


def check_parallelism(r: Resolved) -> list[FieldError]:
    tp, pp = r.spec.parallelism.tensor, r.spec.parallelism.pipeline
    out: list[FieldError] = []
    if r.mig is not None:
        for name, value in (("tensor", tp), ("pipeline", pp)):
            if value > 1:
                out.append(
                    FieldError(
                        f"spec.parallelism.{name}",
                        f"a MIG slice serves a single rank ({name} is {value}): set it to 1 or remove "
                        "spec.target.migProfile",
                    )
                )
    elif tp * pp > r.gpus_per_node:
        out.append(
            FieldError(
                "spec.parallelism.tensor",
                f"tensor x pipeline = {tp * pp} GPUs, but {r.gpu.name} nodes have {r.gpus_per_node}: an engine's "
                "ranks must share a node; lower tensor/pipeline or use quantization to fit fewer GPUs",
            )
        )
    f = r.facts
    if f is None:
        return out
    if f.num_attention_heads % tp:
        # Bounded: the head count is user input and may be huge.
        divisors = [d for d in range(1, min(f.num_attention_heads, 16) + 1) if f.num_attention_heads % d == 0]
        out.append(
            FieldError(
                "spec.parallelism.tensor",
                f"tensor ({tp}) must divide the model's {f.num_attention_heads} attention heads: use one of "
                f"{', '.join(map(str, divisors))}",
            )
        )
    elif f.num_key_value_heads % tp and tp % f.num_key_value_heads:
        out.append(
            FieldError(
                "spec.parallelism.tensor",
                f"tensor ({tp}) and the model's {f.num_key_value_heads} KV heads must divide one another: pick a "
                "tensor size that divides the KV heads or is a multiple of them",
            )
        )
    if pp > f.num_layers:
        out.append(
            FieldError(
                "spec.parallelism.pipeline",
                f"pipeline ({pp}) exceeds the model's {f.num_layers} layers: use at most {f.num_layers}",
            )
        )
    return out


# TensorRT's dimensions are 32-bit: a shape beyond this is not a memory question.
TENSORRT_DIM_MAX = 2**31 - 1


def check_shapes(r: Resolved) -> list[FieldError]:
    """Shapes against TensorRT's dimension range, the model's context length, and each other."""
    s, f = r.shapes, r.facts
    if s is None or f is None:
        return []
    out: list[FieldError] = []
    for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens"):
        value = getattr(s, name)
        if value > TENSORRT_DIM_MAX:
            out.append(
                FieldError(
                    f"spec.build.{_camel(name)}",
                    f"{value} is beyond TensorRT's 32-bit dimensions (at most {TENSORRT_DIM_MAX}): lower it",
                )
            )
    if out:
        return out
    if s.max_seq_len > f.max_position_embeddings:
        if r.shapes_from_traffic:
            field, what = "spec.traffic.outputTokens.max", "inputTokens.max + outputTokens.max"
        else:
            field, what = "spec.build.maxSeqLen", "maxSeqLen"
        out.append(
            FieldError(
                field,
                f"{what} = {s.max_seq_len} exceeds the model's context of {f.max_position_embeddings} tokens: "
                f"lower it to at most {f.max_position_embeddings}",
            )
        )
    if s.max_input_len > s.max_seq_len:
        out.append(
            FieldError(
                "spec.build.maxInputLen",
                f"maxInputLen ({s.max_input_len}) exceeds maxSeqLen ({s.max_seq_len}): lower maxInputLen or raise "
                "maxSeqLen",
            )
        )
    return out


def check_runtime(r: Resolved) -> list[FieldError]:
    """Runtime limits may lower the built shapes, never raise them."""
    s = r.shapes
    if s is None:
        return []
    rt = r.spec.serving.runtime
    out: list[FieldError] = []
    for name, value, built in (
        ("maxBatchSize", rt.max_batch_size, s.max_batch_size),
        ("maxNumTokens", rt.max_num_tokens, s.max_num_tokens),
        ("maxSeqLen", rt.max_seq_len, s.max_seq_len),
    ):
        if value is not None and value > built:
            out.append(
                FieldError(
                    f"spec.serving.runtime.{name}",
                    f"{value} exceeds the built {name} of {built}: lower it to at most {built}, or raise the "
                    "built shape (a rebuild)",
                )
            )
    return out


def shape_warnings(r: Resolved, paged_context_fmha: bool) -> list[str]:
    s = r.shapes
    if s is None or s.max_num_tokens >= s.max_input_len:
        return []
    if not paged_context_fmha:
        return [
            f"maxNumTokens ({s.max_num_tokens}) is below maxInputLen ({s.max_input_len}) without paged context "
            "FMHA: prompts longer than maxNumTokens will be rejected; set pagedContextFmha true or raise maxNumTokens"
        ]
    return [
        f"maxNumTokens ({s.max_num_tokens}) is below maxInputLen ({s.max_input_len}): prompts longer than "
        "maxNumTokens are only served with chunked prefill (enable_chunked_prefill in the server options)"
    ]
