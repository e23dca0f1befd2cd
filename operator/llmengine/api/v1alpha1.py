"""The LLMEngine resource, version v1alpha1.

These models are the single source of the CRD schema (`llmengine generate` writes crds/ from them), so every
field description is what `kubectl explain llmengine.spec...` shows. Descriptions say whether a change rebuilds
the engine or only rolls out the serving pods.

Cross-field rules that must hold even when the operator is down are attached as CEL `x-kubernetes-validations`.
Python enforces the same rules: one-of rules with pydantic validators here, rules that span several objects
(shapes vs traffic, MIG vs parallelism, runtime vs built limits) in the planner, with a better field path.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from llmengine import GROUP, VERSION
from llmengine.api.base import SpecModel, StatusModel
from llmengine.api.base import cel as _cel
from llmengine.api.pods import EnvVar, OperandPods

API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"

Backend = Literal["tensorrt", "pytorch"]
Dtype = Literal["float16", "bfloat16"]
Quantization = Literal["none", "fp8", "int8_weight_only", "int4_awq", "w4a8_awq", "smoothquant", "nvfp4"]
KvCacheDtype = Literal["auto", "fp8", "int8"]
GpuClassName = Literal["A100-40GB", "A100-80GB", "L40S", "H100-80GB", "H100-NVL", "H200", "B200"]
KvCacheType = Literal["paged", "continuous"]
Phase = Literal["Pending", "Queued", "Building", "Deploying", "Ready", "Degraded", "Failed"]

# Names of the build fields that are static shapes (as opposed to feature flags); traffic may not set them too.
SHAPE_FIELDS = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens")

_DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"


# ---------------------------------------------------------------------------------------------------------------
# spec.model


class SecretKeySelector(SpecModel):
    """A key of a Secret in the LLMEngine's namespace."""

    name: str = Field(min_length=1, description="Name of the Secret, in the same namespace as the LLMEngine.")
    key: str = Field(default="token", min_length=1, description="Key in the Secret that holds the value.")


class HuggingFaceSource(SpecModel):
    """Weights from a Hugging Face Hub repository, pinned to one revision."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "size(self.revision) > 0",
                    "spec.model.source.huggingFace.revision is required: pin a commit SHA or a tag",
                )
            ]
        }
    )

    repo: str = Field(
        min_length=1,
        description="Repository id, e.g. meta-llama/Llama-3.1-8B-Instruct. Changing it rebuilds the engine.",
    )
    revision: str = Field(
        min_length=1,
        description=(
            "Commit SHA or tag to build from (required: a branch name would let the weights change under a "
            "built engine). Changing it rebuilds the engine."
        ),
    )
    token_secret_ref: SecretKeySelector | None = Field(
        default=None,
        description=(
            "Secret holding a Hugging Face access token, for gated or private repositories. Used only to "
            "download; changing it neither rebuilds nor rolls out."
        ),
    )


class S3Source(SpecModel):
    """Weights (a Hugging Face style checkpoint directory) in an S3 bucket."""

    uri: str = Field(
        pattern=r"^s3://[^/]+/.*$",
        description="s3://bucket/path/ of the checkpoint directory. Changing it rebuilds the engine.",
    )


class ModelSource(SpecModel):
    """Where the weights come from: exactly one of huggingFace or s3."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "(has(self.huggingFace) ? 1 : 0) + (has(self.s3) ? 1 : 0) == 1",
                    "spec.model.source: set exactly one of huggingFace or s3",
                )
            ]
        }
    )

    hugging_face: HuggingFaceSource | None = Field(
        default=None, description="Download the weights from the Hugging Face Hub."
    )
    s3: S3Source | None = Field(default=None, description="Copy the weights from S3.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if (self.hugging_face is None) == (self.s3 is None):
            raise ValueError("set exactly one of huggingFace or s3")
        return self


class ArchitectureFacts(SpecModel):
    """Facts about a model that is not in the built-in catalog, as found in its config.json."""

    architecture: str = Field(
        min_length=1,
        description="Model class as in config.json `architectures`, e.g. LlamaForCausalLM. Changing it rebuilds.",
    )
    num_layers: int = Field(ge=1, description="Number of transformer layers (num_hidden_layers). Rebuilds.")
    hidden_size: int = Field(ge=1, description="Hidden size. Rebuilds.")
    num_attention_heads: int = Field(ge=1, description="Number of attention (query) heads. Rebuilds.")
    num_key_value_heads: int | None = Field(
        default=None,
        ge=1,
        description="Number of key/value heads (grouped-query attention). Default: numAttentionHeads. Rebuilds.",
    )
    head_dim: int | None = Field(
        default=None, ge=1, description="Size of one attention head. Default: hiddenSize / numAttentionHeads."
    )
    vocab_size: int = Field(ge=1, description="Vocabulary size. Rebuilds.")
    intermediate_size: int | None = Field(default=None, ge=1, description="MLP intermediate size. Rebuilds.")
    parameter_count: int = Field(
        ge=1, description="Total number of parameters (all experts for a mixture of experts). Rebuilds."
    )
    max_position_embeddings: int = Field(
        ge=1, description="Longest context the model supports, in tokens; bounds maxSeqLen. Rebuilds."
    )


class ModelSpec(SpecModel):
    """The model to build: where its weights are and what its architecture is."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "(has(self.catalog) ? 1 : 0) + (has(self.architecture) ? 1 : 0) == 1",
                    "spec.model: set exactly one of catalog (a built-in model name) or architecture (explicit facts)",
                )
            ]
        }
    )

    source: ModelSource = Field(description="Where the weights come from: exactly one of huggingFace or s3.")
    tokenizer: str | None = Field(
        default=None,
        description=(
            "Hugging Face repository or directory of the tokenizer, when it is not next to the weights. "
            "Changing it rolls out without a rebuild."
        ),
    )
    catalog: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "A built-in model whose architecture facts the operator knows (case-insensitive): llama-2-7b, "
            "llama-3.1-8b, llama-3.1-70b, mistral-7b, mixtral-8x7b, qwen2.5-7b, qwen2.5-72b. Exactly one of "
            "catalog or architecture. Switching to explicit facts with the same values does not rebuild."
        ),
    )
    architecture: ArchitectureFacts | None = Field(
        default=None, description="Explicit architecture facts for a model that is not in the catalog."
    )

    @model_validator(mode="after")
    def _catalog_or_architecture(self) -> ModelSpec:
        if (self.catalog is None) == (self.architecture is None):
            raise ValueError("set exactly one of catalog (a built-in model name) or architecture (explicit facts)")
        return self


# ---------------------------------------------------------------------------------------------------------------
# spec.precision, spec.parallelism, spec.build, spec.traffic


class HuggingFaceDataset(SpecModel):
    """A dataset repository on the Hugging Face Hub, pinned to one revision (fetched with the model's token)."""

    repo: str = Field(
        min_length=1,
        description=(
            "Dataset repository id (one configuration, a train split with a text column, e.g. train.jsonl of "
            '{"text": ...} lines). Rebuilds.'
        ),
    )
    revision: str = Field(
        min_length=1,
        description="Commit SHA or tag of the dataset (a branch would let the samples change). Rebuilds.",
    )


class CalibrationDataset(SpecModel):
    """Where the calibration samples come from: exactly one of huggingFace or s3."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "(has(self.huggingFace) ? 1 : 0) + (has(self.s3) ? 1 : 0) == 1",
                    "spec.precision.calibration.dataset: set exactly one of huggingFace or s3",
                )
            ]
        }
    )

    hugging_face: HuggingFaceDataset | None = Field(
        default=None, description="A dataset repository on the Hugging Face Hub, pinned to a revision."
    )
    s3: S3Source | None = Field(
        default=None,
        description="s3://bucket/path/ of a dataset directory (for clusters without Hub access).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> CalibrationDataset:
        if (self.hugging_face is None) == (self.s3 is None):
            raise ValueError("set exactly one of huggingFace or s3")
        return self


class Calibration(SpecModel):
    """Sample text for the quantizations that calibrate (scales measured on real activations).

    The builder fetches the dataset like the model and hands TensorRT-LLM the local copy; nothing is downloaded
    implicitly. The dataset's train split needs a `text` column (e.g. train.jsonl with one {"text": ...} per line).
    Only quantizations that calibrate use it (fp8, int4_awq, w4a8_awq, nvfp4, smoothquant, an fp8 or int8 KV
    cache); for the others it is ignored and stays out of the engine identity.
    """

    dataset: CalibrationDataset = Field(description="Where the calibration samples come from. Rebuilds.")
    samples: int = Field(
        default=512, ge=1, le=65536, description="Number of samples calibrated on. Default 512. Rebuilds."
    )
    max_seq_length: int = Field(
        default=512,
        ge=16,
        le=131072,
        description="Tokens per calibration sample (longer ones are cut). Default 512. Rebuilds.",
    )


class Precision(SpecModel):
    """Numeric formats of the weights, activations and KV cache. Every field here rebuilds the engine."""

    dtype: Dtype = Field(
        default="bfloat16", description="Compute dtype of unquantized layers. Default bfloat16. Rebuilds."
    )
    quantization: Quantization = Field(
        default="none",
        description=(
            "Weight/activation quantization. fp8 and w4a8_awq need SM 8.9+ (L40S, Hopper, Blackwell); nvfp4 "
            "needs Blackwell (SM 10.0); int8_weight_only, int4_awq and smoothquant are not available on "
            "Blackwell. Default none. Rebuilds."
        ),
    )
    kv_cache_dtype: KvCacheDtype = Field(
        default="auto",
        description=(
            "KV cache element type: auto (same as dtype), fp8 (SM 8.9+, halves KV memory) or int8. Default "
            "auto. Rebuilds."
        ),
    )
    calibration: Calibration | None = Field(
        default=None,
        description=(
            "Calibration data, required by the quantizations that calibrate (fp8, int4_awq, w4a8_awq, nvfp4, "
            "smoothquant, kvCacheDtype fp8 or int8): TensorRT-LLM would otherwise download a dataset from the "
            "Hugging Face Hub during the build."
        ),
    )


class Parallelism(SpecModel):
    """How the model is split across GPUs; the engine has one rank per GPU. Both fields rebuild the engine."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("!has(self.tensor) || self.tensor >= 1", "spec.parallelism.tensor must be at least 1"),
                _cel("!has(self.pipeline) || self.pipeline >= 1", "spec.parallelism.pipeline must be at least 1"),
            ]
        }
    )

    tensor: int = Field(
        default=1,
        ge=1,
        description="Tensor-parallel size; must divide numAttentionHeads. Default 1. Rebuilds.",
    )
    pipeline: int = Field(default=1, ge=1, description="Pipeline-parallel size. Default 1. Rebuilds.")


class BuildSpec(SpecModel):
    """Static shapes and compile-time features of the engine. Every field here rebuilds a TensorRT engine.

    Shapes left unset take trtllm-build's defaults, unless spec.traffic derives them.
    """

    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Most requests in flight per engine. Default 2048 (trtllm-build), or derived from spec.traffic. "
            "Rebuilds (tensorrt); a restart with the pytorch backend."
        ),
    )
    max_input_len: int | None = Field(
        default=None,
        ge=1,
        description="Longest prompt, in tokens. Default 1024, or inputTokens.max from spec.traffic. Rebuilds.",
    )
    max_seq_len: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Longest prompt plus output, in tokens; at most the model's maxPositionEmbeddings. Default: "
            "maxPositionEmbeddings, or inputTokens.max + outputTokens.max from spec.traffic. Rebuilds."
        ),
    )
    max_num_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Most tokens in one forward pass (batched prompts plus generated tokens); sizes activation memory. "
            "Default 8192, or derived from spec.traffic. Rebuilds."
        ),
    )
    max_beam_width: int = Field(default=1, ge=1, description="Beam search width. Default 1. Rebuilds.")
    paged_context_fmha: bool | None = Field(
        default=None,
        description=(
            "Paged context attention; needed for chunked prefill and KV cache reuse. Unset: what TensorRT-LLM "
            "makes of it (on with a paged KV cache, off where upstream drops it: an int8 KV cache, or an fp8 KV "
            "cache without fp8/w4a8_awq/nvfp4 quantization on SM 8.9+). Set true where upstream would drop it and "
            "the spec is refused. Rebuilds."
        ),
    )
    fp8_context_fmha: bool | None = Field(
        default=None,
        description=(
            "FP8 context attention. Unset: what TensorRT-LLM makes of it (on with quantization fp8, w4a8_awq or "
            "nvfp4 on SM 8.9+ unless paged context FMHA runs without an fp8 KV cache; forced on with an fp8 KV "
            "cache and paged context FMHA). A value upstream would override is refused. Rebuilds."
        ),
    )
    multiple_profiles: bool = Field(
        default=False,
        description="Build several TensorRT optimization profiles (faster, longer build). Default false. Rebuilds.",
    )
    kv_cache_type: KvCacheType = Field(
        default="paged",
        description=(
            "KV cache layout: paged (default) or continuous (reserves maxBatchSize x maxSeqLen up front). Rebuilds."
        ),
    )
    context_fmha: bool = Field(
        default=True, description="Fused attention for the context phase. Default true. Rebuilds."
    )
    remove_input_padding: bool = Field(
        default=True, description="Pack requests without padding. Default true. Rebuilds."
    )
    strip_plan: bool = Field(
        default=False,
        description="Store the engine without weights and refit them when loading (smaller engine). Rebuilds.",
    )
    weight_streaming: bool = Field(
        default=False,
        description="Let weights stay in host memory and stream to the GPU (slow; for oversized models). Rebuilds.",
    )

    def explicit_shapes(self) -> list[str]:
        """The shape fields (snake_case) the user set."""
        return [name for name in SHAPE_FIELDS if getattr(self, name) is not None]


class TokenDistribution(SpecModel):
    """Length of prompts or outputs, in tokens."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [_cel("self.max >= self.mean", "max must be at least mean: raise max")]
        }
    )

    mean: int = Field(ge=1, description="Typical length, in tokens.")
    max: int = Field(ge=1, description="Longest length to serve, in tokens.")

    @model_validator(mode="after")
    def _max_at_least_mean(self) -> TokenDistribution:
        if self.max < self.mean:
            raise ValueError(f"max ({self.max}) must be at least mean ({self.mean}): raise max")
        return self


class TrafficProfile(SpecModel):
    """The traffic the engine should serve. The build shapes are then derived with trtllm-bench's sizing rules."""

    input_tokens: TokenDistribution = Field(
        description="Prompt lengths. max becomes maxInputLen. Changing it rebuilds when derived shapes change."
    )
    output_tokens: TokenDistribution = Field(
        description="Output lengths. inputTokens.max + outputTokens.max becomes maxSeqLen. Rebuilds when shapes change."
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Requests expected in flight per replica; the plan warns when the KV cache cannot hold them.",
    )


# ---------------------------------------------------------------------------------------------------------------
# spec.target, spec.store


class Target(SpecModel):
    """The GPUs the engine is built for and served on."""

    gpu: GpuClassName = Field(
        description=(
            "GPU class. The engine only loads on the compute capability (SM) it was built for, so changing the "
            "class rebuilds (a class with the same SM still rebuilds: memory differs)."
        )
    )
    mig_profile: str | None = Field(
        default=None,
        pattern=r"^[1-7]g\.[0-9]+gb(\+me)?$",
        description=(
            "Serve on a MIG slice of this profile, e.g. 3g.40gb (must exist for the GPU class; needs tensor and "
            "pipeline parallelism 1). A slice has its parent's SM: changing it rolls out without a rebuild, "
            "unless spec.traffic derives the shapes from the slice memory."
        ),
    )
    node_selector: dict[str, str] | None = Field(
        default=None, description="Extra node labels the build and serving pods require. Rolls out."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Pod affinity (a core/v1 Affinity object) for the build and serving pods. Rolls out.",
    )
    tolerations: list[dict[str, Any]] | None = Field(
        default=None, description="Tolerations (core/v1 Toleration objects) for the build and serving pods. Rolls out."
    )


class SecretRef(SpecModel):
    name: str = Field(min_length=1, description="Name of the Secret, in the same namespace as the LLMEngine.")


class WorkloadIdentity(SpecModel):
    service_account_name: str = Field(
        min_length=1, description="ServiceAccount whose cloud identity may read and write the bucket."
    )


class StoreSpec(SpecModel):
    """The S3 bucket engines are stored in, at s3://bucket/prefix/<engine digest>/."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!(has(self.credentialsSecretRef) && has(self.workloadIdentity))",
                    "spec.store: set at most one of credentialsSecretRef or workloadIdentity",
                )
            ]
        }
    )

    bucket: str = Field(min_length=1, description="Bucket name. Does not change the engine identity.")
    prefix: str = Field(default="engines", description="Key prefix under the bucket. Default engines.")
    endpoint: str | None = Field(
        default=None, description="S3 endpoint URL for S3-compatible stores; unset means AWS S3."
    )
    region: str = Field(default="us-east-1", description="Bucket region. Default us-east-1.")
    credentials_secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
    )
    workload_identity: WorkloadIdentity | None = Field(
        default=None,
        description=(
            "Use a ServiceAccount's cloud identity (IRSA, GKE or Azure workload identity): the build, benchmark and "
            "serving pods run as it, with its token mounted, unless spec.pods.serviceAccountName names another. "
            "The operator checks the store with its own identity."
        ),
    )

    @model_validator(mode="after")
    def _one_credential(self) -> StoreSpec:
        if self.credentials_secret_ref is not None and self.workload_identity is not None:
            raise ValueError("set at most one of credentialsSecretRef or workloadIdentity")
        return self


# ---------------------------------------------------------------------------------------------------------------
# spec.serving, spec.rebuildPolicy


class ResourceRequirements(SpecModel):
    """CPU and memory for the serving container; the operator adds the GPU resource itself."""

    requests: dict[str, int | str] | None = Field(
        default=None, description="Requests, e.g. {cpu: 8, memory: 64Gi}. Rolls out."
    )
    limits: dict[str, int | str] | None = Field(default=None, description="Limits, e.g. {memory: 96Gi}. Rolls out.")


class RuntimeLimits(SpecModel):
    """Serving-time limits; each must be at most the built value. Changing them rolls out without a rebuild."""

    kv_cache_free_gpu_memory_fraction: float = Field(
        default=0.9,
        ge=0.01,
        lt=1,
        description=(
            "Share of the GPU memory left after weights and activations that the KV cache takes (0.01 to below 1). "
            "Default 0.9."
        ),
    )
    max_batch_size: int | None = Field(
        default=None, ge=1, description="Serve at most this many requests at once (<= the built maxBatchSize)."
    )
    max_num_tokens: int | None = Field(
        default=None, ge=1, description="At most this many tokens per forward pass (<= the built maxNumTokens)."
    )
    max_seq_len: int | None = Field(
        default=None, ge=1, description="At most this many tokens per sequence (<= the built maxSeqLen)."
    )


class Autoscaling(SpecModel):
    """A HorizontalPodAutoscaler (autoscaling/v2) on the serving Deployment. While set, it owns the replica count:
    spec.serving.replicas is not applied, a rollout keeps the autoscaler's count, and the operator judges
    availability against what the autoscaler wants. Nothing here rebuilds."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.minReplicas <= self.maxReplicas",
                    "spec.serving.autoscaling: minReplicas must be at most maxReplicas",
                )
            ]
        }
    )

    min_replicas: int = Field(default=1, ge=1, description="Fewest serving pods. Default 1.")
    max_replicas: int = Field(ge=1, description="Most serving pods (each takes the GPUs of one replica).")
    metrics: list[dict[str, Any]] = Field(
        min_length=1,
        description=(
            "autoscaling/v2 MetricSpec objects, as in a HorizontalPodAutoscaler, e.g. a Pods metric "
            "llmengine_requests_in_flight (through a metrics adapter) with target averageValue 8."
        ),
    )
    behavior: dict[str, Any] | None = Field(
        default=None, description="autoscaling/v2 HorizontalPodAutoscalerBehavior (scale-up/down policies)."
    )

    @model_validator(mode="after")
    def _range(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must be at most maxReplicas ({self.max_replicas})")
        return self


class IngressRoute(SpecModel):
    """A networking.k8s.io/v1 Ingress to the engine's Service."""

    host: str = Field(min_length=1, description="Host name the Ingress answers, e.g. llama.models.example.com.")
    class_name: str | None = Field(default=None, description="IngressClass name (ingressClassName).")
    path: str = Field(default="/", pattern=r"^/", description="Path prefix routed to the engine. Default /.")
    tls_secret_name: str | None = Field(default=None, description="Secret with the certificate for host (TLS).")
    annotations: dict[str, str] | None = Field(default=None, description="Annotations (controller settings).")


class GatewayRoute(SpecModel):
    """A Gateway API HTTPRoute (gateway.networking.k8s.io/v1) to the engine's Service."""

    parent_refs: list[dict[str, Any]] = Field(
        min_length=1, description="The Gateways the route attaches to (ParentReference objects: name, namespace...)."
    )
    hostnames: list[str] | None = Field(default=None, description="Host names the route matches.")
    path: str = Field(default="/", pattern=r"^/", description="Path prefix routed to the engine. Default /.")


class Serving(SpecModel):
    """The Deployment that serves the engine with trtllm-serve. Every field here rolls out without a rebuild."""

    replicas: int = Field(default=1, ge=0, description="Number of serving pods. Default 1; 0 keeps the engine only.")
    resources: ResourceRequirements | None = Field(
        default=None, description="CPU and memory of the serving container; GPUs are added by the operator."
    )
    runtime: RuntimeLimits = Field(
        default_factory=RuntimeLimits, description="trtllm-serve limits, at or below the built shapes."
    )
    max_surge: int = Field(
        default=1, ge=0, description="Extra pods (and GPUs) a rollout may start above replicas. Default 1."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API. Default 8000.")
    env: list[EnvVar] | None = Field(
        default=None,
        description=(
            "Extra environment of the server container: {name, value}, or {name, valueFrom} a ConfigMap or "
            "Secret key or a pod field. For every container of every pod (the engine download too), use spec.pods.env."
        ),
    )
    pod_annotations: dict[str, str] | None = Field(
        default=None, description="Annotations on the serving pods (over spec.pods.annotations)."
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Scale the serving pods with a HorizontalPodAutoscaler (replaces replicas)."
    )
    ingress: IngressRoute | None = Field(default=None, description="Expose the engine through an Ingress.")
    http_route: GatewayRoute | None = Field(
        default=None, description="Expose the engine through a Gateway API HTTPRoute."
    )


class RebuildPolicy(SpecModel):
    """When the operator may rebuild on its own, for traffic-aware rebuilds. Changes here do nothing to the engine."""

    mode: Literal["Auto", "Manual"] = Field(
        default="Manual",
        description=(
            "Auto lets the operator rebuild with new shapes when observed traffic outgrows them. Default Manual."
        ),
    )
    cooldown: str = Field(
        default="1h", pattern=_DURATION, description="Least time between automatic rebuilds, e.g. 30m, 1h. Default 1h."
    )
    headroom: float = Field(
        default=1.2,
        ge=1.0,
        le=4.0,
        description="Factor applied to observed traffic when sizing a rebuild. Default 1.2.",
    )
    window: str = Field(
        default="15m",
        pattern=_DURATION,
        description="Span of serving traffic the observed profile covers, e.g. 15m. Default 15m.",
    )
    min_requests: int = Field(
        default=100,
        ge=1,
        description="Requests the window must hold before the envelope is judged (fewer: no verdict). Default 100.",
    )
    max_queue_seconds: float = Field(
        default=2.0,
        gt=0,
        description=(
            "Queue time (p90 over the window, from trtllm-serve) above which traffic counts as sustained queueing. "
            "Default 2."
        ),
    )
    min_refused: int = Field(
        default=10,
        ge=1,
        description=(
            "Prompts refused as too long that count as a sustained excess: at least this many in the window, and at "
            "least minRefusedPercent of its requests. Fewer are reported, not acted on. Default 10."
        ),
    )
    min_refused_percent: float = Field(
        default=2.0,
        ge=0,
        le=100,
        description="Share of the window's requests that must be refused as too long to count (with minRefused). "
        "Default 2.",
    )


class BenchmarkThresholds(SpecModel):
    """Absolute bounds a new engine's benchmark must meet before traffic moves to it."""

    min_requests_per_second: float | None = Field(default=None, gt=0, description="Least request throughput.")
    min_output_tokens_per_second: float | None = Field(default=None, gt=0, description="Least output tokens/s.")
    max_ttft_p99_ms: float | None = Field(default=None, gt=0, description="Highest p99 time to first token, in ms.")
    max_itl_p99_ms: float | None = Field(
        default=None, gt=0, description="Highest p99 inter-token latency (time per output token), in ms."
    )


class BenchmarkSpec(SpecModel):
    """A trtllm-bench run on every new engine before traffic moves to it. Changes here never rebuild."""

    num_requests: int = Field(
        default=256, ge=8, le=100_000, description="Requests in the generated dataset. Default 256."
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Requests in flight during the run. Default: spec.traffic.concurrency, else the max batch size.",
    )
    thresholds: BenchmarkThresholds | None = Field(default=None, description="Absolute bounds to meet.")
    max_regression_percent: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description=(
            "How much worse than the serving engine's benchmark (throughput lower, latency higher) the new engine "
            "may be, in percent. Unset: no comparison."
        ),
    )


# ---------------------------------------------------------------------------------------------------------------
# spec


def _runtime_le_built(field: str) -> JsonDict:
    runtime, built = f"self.serving.runtime.{field}", f"self.build.{field}"
    return _cel(
        f"!(has(self.serving) && has(self.serving.runtime) && has({runtime}) && has(self.build) && has({built}))"
        f" || {runtime} <= {built}",
        f"spec.serving.runtime.{field} must be at most spec.build.{field}: lower it or raise the built value",
    )


class LLMEngineSpec(SpecModel):
    """Desired state of an LLMEngine: a model compiled for a GPU class and served with trtllm-serve."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!(has(self.traffic) && has(self.build) && (has(self.build.maxBatchSize) || "
                    "has(self.build.maxInputLen) || has(self.build.maxSeqLen) || has(self.build.maxNumTokens)))",
                    "spec.traffic and the shapes in spec.build (maxBatchSize, maxInputLen, maxSeqLen, maxNumTokens) "
                    "are exclusive: remove one",
                ),
                _cel(
                    "!has(self.target.migProfile) || !has(self.parallelism) || "
                    "((!has(self.parallelism.tensor) || self.parallelism.tensor == 1) && "
                    "(!has(self.parallelism.pipeline) || self.parallelism.pipeline == 1))",
                    "spec.target.migProfile needs spec.parallelism.tensor and pipeline of 1: remove migProfile or "
                    "the parallelism",
                ),
                _runtime_le_built("maxBatchSize"),
                _runtime_le_built("maxNumTokens"),
                _runtime_le_built("maxSeqLen"),
            ]
        }
    )

    model: ModelSpec = Field(description="The model: weights source and architecture.")
    backend: Backend = Field(
        default="tensorrt",
        description=(
            "tensorrt compiles a static-shape engine (TensorRT-LLM 1.0-1.2.x); pytorch prepares a checkpoint and "
            "passes shapes as runtime flags. Default tensorrt. Rebuilds."
        ),
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Deprecated: a TensorRT-LLM release image whose tag names the version (e.g. "
            f"{DEFAULT_IMAGE}); use trtllmVersion. It never chooses what runs: the operator's images for the "
            "version do."
        ),
    )
    trtllm_version: str | None = Field(
        default=None,
        pattern=r"^[0-9]+\.[0-9]+(\.[0-9]+)?([.+-]?[A-Za-z0-9.]+)?$",
        description=(
            "TensorRT-LLM release that builds and serves the engine, e.g. 1.2.1. It selects the builder and server "
            "images the operator is configured with for that release (a release without images is refused, "
            "naming the configured ones). Unset: the operator's default release. Rebuilds."
        ),
    )
    precision: Precision = Field(default_factory=Precision, description="dtype, quantization and KV cache type.")
    parallelism: Parallelism = Field(default_factory=Parallelism, description="Tensor and pipeline parallelism.")
    build: BuildSpec = Field(default_factory=BuildSpec, description="Static shapes and compile-time features.")
    traffic: TrafficProfile | None = Field(
        default=None,
        description="Derive the shapes from a traffic profile instead of setting them in spec.build.",
    )
    target: Target = Field(description="GPU class (and optional MIG profile) and scheduling constraints.")
    store: StoreSpec | None = Field(
        default=None, description="Where engines are stored. Unset: the operator's default store."
    )
    serving: Serving = Field(default_factory=Serving, description="How the engine is served.")
    rebuild_policy: RebuildPolicy = Field(
        default_factory=RebuildPolicy, description="Whether the operator may rebuild on its own."
    )
    benchmark: BenchmarkSpec | None = Field(
        default=None,
        description="Benchmark every new engine with trtllm-bench and roll out only if it passes. Unset: no gate.",
    )
    pods: OperandPods | None = Field(
        default=None,
        description=(
            "Pull secrets, runtime and priority class, service account, labels, annotations, environment, volumes, "
            "proxy and CA bundle of the build, benchmark and serving pods; under build and serving, of one kind "
            "only. Precedence, lowest first: the operator's defaults (chart value enginePods), their build or "
            "serving, these, these build or serving. A build Job shared by LLMEngines of one identity runs with the "
            "settings of the engine that started it. Never rebuilds: a change rolls out the serving pods and "
            "applies to the next build."
        ),
    )


# ---------------------------------------------------------------------------------------------------------------
# status


class Condition(StatusModel):
    type: str = Field(description="CamelCase condition type, e.g. Ready, EngineBuilt.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(default=None, description="CamelCase reason for the last transition.")
    message: str | None = Field(default=None, description="Human-readable detail.")
    last_transition_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When status last changed."
    )
    observed_generation: int | None = Field(default=None, description="Generation this condition was computed for.")


class EngineRef(StatusModel):
    digest: str | None = Field(
        default=None,
        description="Engine identity: sha256 of its build inputs (names of Jobs and pods use e-<first 12 hex>).",
    )
    uri: str | None = Field(default=None, description="s3:// location of the committed engine.")
    short: str | None = Field(default=None, description="The digest's first 12 hex, as in Job and pod names.")


class BuildStatus(StatusModel):
    job: str | None = Field(default=None, description="Name of the current or last build Job.")
    queue_position: int | None = Field(default=None, description="Position in the build queue while Queued (1 = next).")
    attempts: int | None = Field(default=None, description="Build attempts for the desired engine.")
    last_failure: str | None = Field(default=None, description="Why the last attempt failed.")
    failed_attempt: int | None = Field(
        default=None, description="The attempt lastFailure belongs to (a failure is reported once per attempt)."
    )
    started_at: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When the current build started."
    )
    quarantined_at: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description=(
            "When the committed engine of this identity was quarantined because its files failed verification "
            "(kept in the store under quarantine/, rebuilt once; a second failure stalls instead)."
        ),
    )
    quarantine_reason: str | None = Field(default=None, description="What failed verification.")
    stage: str | None = Field(
        default=None,
        description="Stage the running build is in, as its builder reports it: fetch, compile, verify or upload.",
    )
    stage_started_at: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When the running build entered stage."
    )
    last_duration_seconds: float | None = Field(default=None, description="How long the last build took.")
    next_retry_at: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When a failed build is retried."
    )


class TokenStats(StatusModel):
    p50: int | None = Field(default=None, description="Median, in tokens.")
    p99: int | None = Field(default=None, description="99th percentile, in tokens.")
    max: int | None = Field(default=None, description="Largest seen (upper bound of its histogram bucket).")


class TrafficStatus(StatusModel):
    """Traffic the serving pods saw over the window, from their /llmengine/metrics."""

    observed_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"}, description="When.")
    window_seconds: float | None = Field(default=None, description="Span the numbers cover.")
    requests: int | None = Field(default=None, description="Requests finished or refused in the window.")
    input_tokens: TokenStats | None = Field(default=None, description="Prompt lengths.")
    output_tokens: TokenStats | None = Field(default=None, description="Output lengths.")
    concurrency: TokenStats | None = Field(default=None, description="Requests in flight per serving pod.")
    rejected_too_long: int | None = Field(default=None, description="Requests refused as longer than the engine.")
    cut_for_length: int | None = Field(default=None, description="Requests that stopped at a length limit.")
    queue_p90_seconds: float | None = Field(default=None, description="90th percentile of trtllm-serve queue time.")


class Recommendation(StatusModel):
    reason: str | None = Field(default=None, description="What outgrew the engine, with numbers.")
    patch: str | None = Field(default=None, description="The spec change (JSON merge patch) that fits the traffic.")
    shapes: dict[str, int] | None = Field(default=None, description="The shapes that patch builds.")


class EnvelopeStatus(StatusModel):
    """The served engine's static limits, how traffic compares, and what traffic-aware rebuilds did."""

    max_batch_size: int | None = Field(default=None, description="Built max batch size of the serving engine.")
    max_input_len: int | None = Field(default=None, description="Built max input length.")
    max_seq_len: int | None = Field(default=None, description="Built max sequence length.")
    max_num_tokens: int | None = Field(default=None, description="Built max tokens per iteration.")
    exceeded: list[str] | None = Field(default=None, description="Limits the observed traffic went past.")
    recommendation: Recommendation | None = Field(default=None, description="What to change (Manual and Auto).")
    refused_too_long: int | None = Field(
        default=None, description="Prompts refused as too long in the window (status.traffic.rejectedTooLong)."
    )
    refused_to_act: int | None = Field(
        default=None,
        description="Refusals in the window at which they count as sustained (rebuildPolicy.minRefused and "
        "minRefusedPercent): how close the traffic is to an excess.",
    )
    auto_shapes: dict[str, int] | None = Field(
        default=None,
        description=(
            "Shapes raised by rebuildPolicy Auto (never below the spec's), keyed like spec.build (maxInputLen, ...); "
            "part of the identity."
        ),
    )
    last_auto_rebuild: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When Auto last raised the shapes."
    )

    @field_validator("auto_shapes", mode="before")
    @classmethod
    def _camel_keys(cls, value: Any) -> Any:
        # Statuses written before the keys followed the camelCase convention held max_input_len etc.
        if isinstance(value, dict):
            return {to_camel(str(k)): v for k, v in value.items()}
        return value


class BenchmarkResult(StatusModel):
    requests_per_second: float | None = Field(default=None, description="Request throughput.")
    output_tokens_per_second: float | None = Field(default=None, description="Output token throughput.")
    ttft_p50_ms: float | None = Field(default=None, description="Median time to first token, ms.")
    ttft_p99_ms: float | None = Field(default=None, description="p99 time to first token, ms.")
    itl_p50_ms: float | None = Field(default=None, description="Median inter-token latency, ms.")
    itl_p99_ms: float | None = Field(default=None, description="p99 inter-token latency, ms.")
    test_benchmark: bool | None = Field(
        default=None, description="True when numbers came from the test benchmarker, not trtllm-bench."
    )


class BenchmarkStatus(StatusModel):
    engine_digest: str | None = Field(default=None, description="Engine the run measured.")
    job: str | None = Field(default=None, description="Benchmark Job.")
    verdict: Literal["Running", "Passed", "Failed"] | None = Field(default=None, description="Outcome.")
    reasons: list[str] | None = Field(default=None, description="Why it failed (thresholds or regression).")
    result: BenchmarkResult | None = Field(default=None, description="Measured numbers.")
    serving: BenchmarkResult | None = Field(
        default=None, description="The serving engine's numbers, the baseline for maxRegressionPercent."
    )


class LLMEngineStatus(StatusModel):
    """Observed state, written by the operator."""

    phase: Phase | None = Field(
        default=None, description="Pending, Queued, Building, Deploying, Ready, Degraded or Failed."
    )
    conditions: list[Condition] | None = Field(
        default=None,
        description="Current conditions (Kubernetes conventions).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, description="Last spec generation acted on.")
    desired_engine: EngineRef | None = Field(default=None, description="The engine the current spec calls for.")
    serving_engine: EngineRef | None = Field(default=None, description="The engine the serving pods run.")
    build: BuildStatus | None = Field(default=None, description="Progress of the build of the desired engine.")
    gpu: str | None = Field(default=None, description="GPUs per replica, e.g. H100-80GB x2 or A100-40GB/3g.20gb.")
    ready_replicas: int | None = Field(default=None, description="Serving pods ready.")
    selector: str | None = Field(
        default=None, description="Label selector of the serving pods (for the scale subresource and autoscalers)."
    )
    url: str | None = Field(
        default=None,
        description=(
            "In-cluster base URL of the OpenAI-compatible API (the Service llme-<name>): POST "
            "<url>/v1/chat/completions or /v1/completions, GET <url>/health. Set once serving pods exist."
        ),
    )
    replicas: int | None = Field(default=None, description="Serving pods.")
    message: str | None = Field(default=None, description="What is happening or what is wrong, in one line.")
    traffic: TrafficStatus | None = Field(default=None, description="Observed serving traffic.")
    envelope: EnvelopeStatus | None = Field(default=None, description="Static limits against observed traffic.")
    benchmark: BenchmarkStatus | None = Field(default=None, description="The benchmark gate of the desired engine.")


class LLMEngine(BaseModel):
    """An LLM compiled into a TensorRT-LLM engine for one GPU class, stored in S3 and served."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    api_version: Literal["llmengine.io/v1alpha1"] = Field(default="llmengine.io/v1alpha1")
    kind: Literal["LLMEngine"] = Field(default="LLMEngine")
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LLMEngineSpec
    status: LLMEngineStatus | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace") or "default")


# ---------------------------------------------------------------------------------------------------------------
# parsing


@dataclass(frozen=True)
class FieldError:
    """One problem with a manifest: the field path (spec.precision.quantization) and what to do about it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidEngine(ValueError):
    """An LLMEngine object that does not match the schema."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("invalid LLMEngine:\n" + "\n".join(f"  {e}" for e in errors))


def field_path(loc: tuple[int | str, ...]) -> str:
    """('spec', 'serving', 'env', 0, 'name') -> 'spec.serving.env[0].name'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at loc (for suggestions on unknown fields)."""
    current: Any = LLMEngine
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = next(
            (f for n, f in current.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """The model class inside X | None or list[X], if any."""
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def _message(err: Any) -> str:
    kind, msg, loc = err["type"], str(err["msg"]), tuple(err["loc"])
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = sorted(f.alias or n for n, f in parent.model_fields.items()) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"known fields: {', '.join(known)}"
        return f"unknown field; {hint}"
    return msg.removeprefix("Value error, ")


def errors_from_validation(exc: ValidationError) -> list[FieldError]:
    """Turn pydantic errors into FieldErrors with camelCase paths like spec.build.maxSeqLen."""
    out: list[FieldError] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        out.append(FieldError(field=field_path(loc) or "(object)", message=_message(err)))
    return out


def parse_engine(obj: dict[str, Any]) -> LLMEngine:
    """Validate a Kubernetes object (as a dict) as an LLMEngine; raise InvalidEngine listing every bad field."""
    if not isinstance(obj, dict):
        raise InvalidEngine([FieldError("(object)", f"expected a mapping, got {type(obj).__name__}")])
    try:
        return LLMEngine.model_validate(obj)
    except ValidationError as exc:
        raise InvalidEngine(errors_from_validation(exc)) from None
